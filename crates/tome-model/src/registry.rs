//! The architectures tome runs, by the `model_type` of their `config.json`: the one list of
//! them. Adding an architecture is its own file (a config, a loader and an
//! [`Architecture`](crate::model::Architecture) impl) plus its line in `model_types!` below;
//! the compiler then asks for its loader arm, and nothing else names it.

use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

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

/// Declares [`ModelType`] with its list and names from one line per `model_type`.
macro_rules! model_types {
    ($($(#[$doc:meta])* $variant:ident => $name:expr,)*) => {
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
    };
}

model_types! {
    Bert => "bert",
    Roberta => "roberta",
    XlmRoberta => "xlm-roberta",
    Camembert => "camembert",
    Longformer => "longformer",
    BigBird => "big_bird",
    /// tome's own Performer schema (docs/models/performer.md).
    Performer => PERFORMER,
    Gpt2 => "gpt2",
    GptNeo => "gpt_neo",
    Llama => "llama",
    Switch => "switch_transformers",
    TransfoXl => "transfo-xl",
    /// tome's own Compressive Transformer schema (docs/models/compressive.md).
    Compressive => COMPRESSIVE,
    Reformer => "reformer",
    Mpnet => "mpnet",
    ModernBert => "modernbert",
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

    /// Loads the architecture from its `config.json` text and the checkpoint's weights.
    pub fn load(self, config: &str, vb: VarBuilder) -> Result<Model> {
        Ok(match self {
            Self::Bert | Self::Roberta | Self::XlmRoberta | Self::Camembert | Self::Longformer | Self::BigBird | Self::Performer => {
                Model::new(BertModel::load(vb, &parse::<BertConfig>(config)?)?)
            }
            Self::Gpt2 => Model::new(Gpt2Model::load(vb, &parse::<Gpt2Config>(config)?)?),
            Self::GptNeo => Model::new(GptNeoModel::load(vb, &parse::<GptNeoConfig>(config)?)?),
            Self::Llama => Model::new(LlamaModel::load(vb, &parse::<LlamaConfig>(config)?)?),
            Self::Switch => Model::new(SwitchModel::load(vb, &parse::<SwitchConfig>(config)?)?),
            Self::TransfoXl | Self::Compressive => Model::new(TransfoXlModel::load(vb, &parse::<TransfoXlConfig>(config)?)?),
            Self::Reformer => Model::new(ReformerModel::load(vb, &parse::<ReformerConfig>(config)?)?),
            Self::Mpnet => Model::new(MpnetModel::load(vb, &parse::<MpnetConfig>(config)?)?),
            Self::ModernBert => Model::new(ModernBertModel::load(vb, &parse::<ModernBertConfig>(config)?)?),
        })
    }
}

fn parse<C: DeserializeOwned>(config: &str) -> Result<C> {
    serde_json::from_str(config).map_err(|e| ModelError::Config { field: "(config.json)".into(), msg: e.to_string() })
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
}
