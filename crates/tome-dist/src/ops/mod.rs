//! Each attention family's communication plan over a [`Group`](crate::Group).
//!
//! Operators take the calling rank's shard of queries, keys and values (`[heads, shard, dim]`,
//! positions from the [`ShardPlan`](crate::ShardPlan)) and return that rank's rows of the
//! output, equal to what one rank holding the whole sequence computes.

pub mod dense;
mod keys;
pub mod window;

pub use dense::{ring_attention, DenseSpec};
pub use keys::KeyBlock;
pub use window::{window_attention, GlobalTokens, WindowSpec};
