//! Text-to-SQL in the product: the database's schema rendered for prompts ([`schema`]), the
//! grammar of queries over its own tables and columns ([`grammar`]), and execution voting over
//! sampled queries ([`vote`]), examples chosen by structure ([`skeleton`]); [`ask`] puts one question to one database with all of them.

pub mod ask;
pub mod grammar;
pub mod schema;
pub mod skeleton;
pub mod vote;

pub use ask::{ask, sql_prompt, Answer, AskOptions};
pub use grammar::{sql_grammar, GrammarTable};
pub use schema::DbSchema;
pub use skeleton::{mask_question, skeleton_similarity, sql_skeleton};
pub use vote::{run_samples, vote, SampleClass, SampleResult, Vote, VoteSample};
