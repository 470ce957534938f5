//! Property-based fuzzing of every parser that takes outside input: the configuration file,
//! control-socket requests and replies, and UAPI messages. None may panic; a refusal of a
//! configuration always names the file, and every line and column it reports lies inside the
//! input, with the source line it shows being that line of the input.

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

/// Every error names the file and points inside `text`.
fn check_refusal(text: &str, errors: &config::ConfigErrors) -> Result<(), TestCaseError> {
    prop_assert!(!errors.is_empty());
    let lines: Vec<&str> = text.split('\n').collect();
    for e in errors {
        prop_assert!(e.to_string().starts_with(FILE), "{e}");
        if let Some(l) = &e.location {
            prop_assert!(l.line >= 1 && l.line <= lines.len(), "{e}");
            let line = lines[l.line - 1].trim_end_matches('\r');
            prop_assert_eq!(l.source_line.as_str(), line, "{}", e);
            prop_assert!(
                l.column >= 1 && l.column <= line.chars().count() + 1,
                "{}",
                e
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn config_parser_never_panics_on_arbitrary_text(s in ".*") {
        if let Err(e) = config::parse(&s, FILE) {
            check_refusal(&s, &e)?;
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
            check_refusal(&mutated, &e)?;
        }
    }

    #[test]
    fn config_parser_points_inside_toml_shaped_text(
        s in "(\\[{1,2}[a-z_.]{1,12}\\]{1,2}\n|[a-z_]{1,10} = (\"[a-z0-9./: ]{0,20}\"|[0-9-]{1,7}|true|\\[\"[0-9./]{1,16}\"\\]|\\{ [a-z]{1,5} = 1 \\})\r?\n|# .{0,10}\n|\t\n){0,16}"
    ) {
        if let Err(e) = config::parse(&s, FILE) {
            check_refusal(&s, &e)?;
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
