//! The architectures tome runs, by the `model_type` of their `config.json`: the one list of
//! them. Adding an architecture is its own file (a serde config, a loader and an
//! [`Architecture`](crate::model::Architecture) impl) plus its line in `model_types!` below,
//! which names its `model_type`, its config and its model; nothing else names it.
//!
//! `config.json` is read once into [`ModelConfig`], whose variant its `model_type` chooses;
//! every choice inside a config is a typed enum, so a value tome does not implement is refused
//! there, with the field's path, before any weight is read.

use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use crate::bert::BertModel;
use crate::config::{BertConfig, PERFORMER};
use crate::error::{ModelError, Result};
use crate::gpt2::{Gpt2Config, Gpt2Model};
use crate::gpt_neo::{GptNeoConfig, GptNeoModel};
use crate::llama::{LlamaConfig, LlamaModel};
use crate::model::Model;
use crate::modernbert::{ModernBertConfig, ModernBertModel};
use crate::mpnet::{MpnetConfig, MpnetModel};
use crate::reformer::{ReformerConfig, ReformerModel};
use crate::switch::{SwitchConfig, SwitchModel};
use crate::transfo_xl::{TransfoXlConfig, TransfoXlModel, COMPRESSIVE};

/// Declares [`ModelType`] and [`ModelConfig`] from one line per `model_type`:
/// `Variant => "model_type", Config => Model,` where `Model::load(vb, &Config)` builds an
/// [`Architecture`](crate::model::Architecture).
macro_rules! model_types {
    ($($(#[$doc:meta])* $variant:ident => $name:expr, $config:ty => $model:ty,)*) => {
        /// A `model_type` tome can load.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum ModelType {
            $($(#[$doc])* $variant,)*
        }

        impl ModelType {
            /// Every type, in the order error messages list them.
            pub const ALL: &[ModelType] = &[$(Self::$variant,)*];

            /// Its `model_type` in `config.json`.
            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)*
                }
            }
        }

        /// A `config.json`, typed by its `model_type`.
        #[derive(Clone, Debug)]
        pub enum ModelConfig {
            $($variant($config),)*
        }

        impl ModelConfig {
            /// Reads `config.json` once: its `model_type` chooses the config it is read as.
            pub fn from_json(text: &str) -> Result<Self> {
                let value: serde_json::Value = serde_json::from_str(text).map_err(|e| config_err("(config.json)", format!("not valid JSON: {e}")))?;
                let model_type = match value.get("model_type") {
                    None => return Err(config_err("model_type", "missing")),
                    Some(v) => ModelType::from_name(v.as_str().ok_or_else(|| config_err("model_type", format!("{v} is not a string")))?)?,
                };
                Ok(match model_type {
                    $(ModelType::$variant => Self::$variant(typed(value)?),)*
                })
            }

            pub fn model_type(&self) -> ModelType {
                match self {
                    $(Self::$variant(_) => ModelType::$variant,)*
                }
            }

            /// The architecture, with the checkpoint's weights.
            pub fn load(&self, vb: VarBuilder) -> Result<Model> {
                Ok(match self {
                    $(Self::$variant(c) => Model::new(<$model>::load(vb, c)?),)*
                })
            }
        }
    };
}

model_types! {
    Bert => "bert", BertConfig => BertModel,
    Roberta => "roberta", BertConfig => BertModel,
    XlmRoberta => "xlm-roberta", BertConfig => BertModel,
    Camembert => "camembert", BertConfig => BertModel,
    Longformer => "longformer", BertConfig => BertModel,
    BigBird => "big_bird", BertConfig => BertModel,
    /// tome's own Performer schema (docs/models/performer.md).
    Performer => PERFORMER, BertConfig => BertModel,
    Gpt2 => "gpt2", Gpt2Config => Gpt2Model,
    GptNeo => "gpt_neo", GptNeoConfig => GptNeoModel,
    Llama => "llama", LlamaConfig => LlamaModel,
    Switch => "switch_transformers", SwitchConfig => SwitchModel,
    TransfoXl => "transfo-xl", TransfoXlConfig => TransfoXlModel,
    /// tome's own Compressive Transformer schema (docs/models/compressive.md).
    Compressive => COMPRESSIVE, TransfoXlConfig => TransfoXlModel,
    Reformer => "reformer", ReformerConfig => ReformerModel,
    Mpnet => "mpnet", MpnetConfig => MpnetModel,
    ModernBert => "modernbert", ModernBertConfig => ModernBertModel,
}

impl ModelType {
    /// The type `config.json` names, or an error listing the ones tome loads.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL.iter().copied().find(|t| t.name() == name).ok_or_else(|| ModelError::Config {
            field: "model_type".into(),
            msg: format!("`{name}` is not supported ({})", Self::ALL.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")),
        })
    }

    /// The BERT-family encoders, which share one implementation.
    pub fn is_bert_family(self) -> bool {
        matches!(self, Self::Bert | Self::Roberta | Self::XlmRoberta | Self::Camembert | Self::Longformer | Self::BigBird | Self::Performer)
    }
}

/// A config's own `model_type` field (a family sharing one config tells its members apart).
impl<'de> Deserialize<'de> for ModelType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        ModelType::from_name(&name).map_err(serde::de::Error::custom)
    }
}

fn config_err(field: &str, msg: impl Into<String>) -> ModelError {
    ModelError::Config { field: field.into(), msg: msg.into() }
}

/// `value` read as `C`; an error names the path of the field at fault.
fn typed<C: DeserializeOwned>(value: serde_json::Value) -> Result<C> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        config_err(if field == "." { "(config.json)" } else { &field }, e.into_inner().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_is_found_by_its_name_and_an_unknown_one_is_refused_with_the_list() {
        for &t in ModelType::ALL {
            assert_eq!(ModelType::from_name(t.name()).unwrap(), t);
        }
        let err = ModelType::from_name("mamba").unwrap_err().to_string();
        assert!(err.contains("`mamba` is not supported") && err.contains("gpt_neo") && err.contains("tome-compressive"), "{err}");
    }

    fn bert_config(extra: &str) -> String {
        format!(
            r#"{{"model_type": "roberta", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 20{extra}}}"#
        )
    }

    #[test]
    fn a_config_is_read_once_as_the_type_its_model_type_names() {
        let config = ModelConfig::from_json(&bert_config("")).unwrap();
        assert_eq!(config.model_type(), ModelType::Roberta);
        let ModelConfig::Roberta(bert) = config else { panic!("{config:?}") };
        assert_eq!(bert.model_type, ModelType::Roberta, "the family member is kept");
        assert_eq!(bert.position_offset(), 1, "RoBERTa numbers positions from pad_token_id + 1");
        let missing = ModelConfig::from_json(r#"{"vocab_size": 3}"#).unwrap_err().to_string();
        assert!(missing.contains("model_type") && missing.contains("missing"), "{missing}");
        let unknown = ModelConfig::from_json(r#"{"model_type": "mamba"}"#).unwrap_err().to_string();
        assert!(unknown.contains("`mamba` is not supported"), "{unknown}");
    }

    #[test]
    fn a_choice_tome_does_not_implement_is_refused_naming_its_field() {
        let cases = [
            (bert_config(r#", "hidden_act": "gelu_10""#), "hidden_act", "gelu_10"),
            (bert_config(r#", "position_embedding_type": "relative_key""#), "position_embedding_type", "relative_key"),
            (bert_config(r#", "attention_type": "sliding""#), "attention_type", "sliding"),
            (r#"{"model_type": "gpt_neo", "vocab_size": 10, "hidden_size": 8, "num_layers": 1, "num_heads": 2, "max_position_embeddings": 8, "window_size": 4, "attention_types": [[["global", "sparse"], 1]]}"#.into(), "attention_types[0][0][1]", "sparse"),
            (r#"{"model_type": "gpt2", "vocab_size": 10, "n_embd": 8, "n_layer": 1, "n_head": 2, "n_positions": 8, "activation_function": "quick_gelu"}"#.into(), "activation_function", "quick_gelu"),
            (r#"{"model_type": "reformer", "attn_layers": ["lsh", "dense"]}"#.into(), "attn_layers[1]", "dense"),
        ];
        for (config, field, value) in cases {
            let err = ModelConfig::from_json(&config).unwrap_err().to_string();
            assert!(err.contains(field) && err.contains(value), "{field}: {err}");
        }
        let ModelConfig::Bert(c) = ModelConfig::from_json(&bert_config(r#", "hidden_act": "gelu_pytorch_tanh""#).replace("roberta", "bert")).unwrap() else { panic!() };
        assert_eq!(c.hidden_act, crate::config::Activation::GeluTanh, "transformers' other names for the tanh GELU");
    }
}
