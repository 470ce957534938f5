//! Property-based fuzzing of every parser that takes outside input: the configuration file,
//! control-socket requests and replies, and UAPI messages. None may panic; a refusal of a
//! configuration always names the file.

use mesh_proto::config;
use mesh_proto::wire::control::{Request, Response};
use mesh_proto::wire::uapi::{parse_get, parse_set};
use proptest::prelude::*;

const FILE: &str = "/etc/meshd/meshd.toml";

fn valid_config() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../configs/dock-mirror.toml"
    ))
    .expect("configs/dock-mirror.toml")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn config_parser_never_panics_on_arbitrary_text(s in ".*") {
        if let Err(e) = config::parse(&s, FILE) {
            prop_assert!(e.to_string().starts_with(FILE), "{e}");
        }
    }

    #[test]
    fn config_parser_never_panics_on_mutated_configs(
        cut in 0usize..4000, insert in "[\\[\\]=\"a-z0-9./:, \n-]{0,12}", drop in 0usize..40
    ) {
        let text = valid_config();
        let at = cut.min(text.len());
        let at = (0..=at).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        let end = (at + drop).min(text.len());
        let end = (end..=text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
        let mutated = format!("{}{}{}", &text[..at], insert, &text[end..]);
        if let Err(e) = config::parse(&mutated, FILE) {
            prop_assert!(e.to_string().starts_with(FILE), "{e}");
        }
    }

    #[test]
    fn control_lines_never_panic(s in ".*") {
        let _ = Request::from_line(&s);
        let _ = Response::from_line(&s);
    }

    #[test]
    fn uapi_messages_never_panic(s in "([a-z_]{1,24}=[0-9a-f:.\\[\\]/x-]{0,70}\n){0,12}") {
        let _ = parse_set(&s);
        let _ = parse_get(&s);
    }
}

#[test]
fn the_valid_config_used_for_mutation_parses() {
    config::parse(&valid_config(), FILE).expect("dock-mirror.toml parses");
}
