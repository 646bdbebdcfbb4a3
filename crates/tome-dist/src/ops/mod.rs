//! Each attention family's communication plan over a [`Group`](crate::Group).
//!
//! Operators take the calling rank's shard of queries, keys and values (`[heads, shard, dim]`,
//! positions from the [`ShardPlan`](crate::ShardPlan)) and return that rank's rows of the
//! output, equal to what one rank holding the whole sequence computes.

pub mod blocksparse;
pub mod dense;
mod exchange;
pub mod favor;
mod global;
mod keys;
pub mod lsh;
pub mod moe;
pub mod recurrent;
pub mod window;
pub mod window_stream;

pub use blocksparse::{blocksparse_attention, blocksparse_exchange, blocksparse_keys, query_block_runs, BlockRows};
pub use dense::{ring_attention, ring_attention_with_bias, DenseSpec};
pub use exchange::{RowExchange, Runs};
pub use favor::{favor_attention, FavorSpec};
pub use global::{gather_global_keys, gather_global_queries, merge_global_partials};
pub use keys::KeyBlock;
pub use lsh::lsh_attention;
pub use moe::{apply_experts, route_tokens, Routing};
pub use recurrent::{segment_recurrence, Compression, CompressiveMemory, Memory, XlMemory};
pub use window::{window_attention, window_exchange, window_keys, window_margins, GlobalTokens, WindowKeys, WindowSpec};
pub use window_stream::{window_key_stream, HeadRows, KeyShape, KeysOrValues, WindowKeyStream};
