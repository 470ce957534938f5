//! Taking secrets out of text that is meant for someone else (`meshctl bugreport`): the
//! host's private keys and join token as read from their files, and anything shaped like an
//! invitation token wherever it appears (a journal line, a pasted command).

use crate::wire::token::TOKEN_PREFIX;

/// What a removed secret is replaced with.
pub const REDACTED: &str = "<redacted>";

/// `text` with every occurrence of each of `secrets` (trimmed; shorter than 8 characters
/// ignored, as such a string is no key and would blot out ordinary words) replaced by
/// [`REDACTED`], and every invitation token (`meshd1.` and the base64url after it) replaced
/// by `meshd1.<redacted>`.
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_owned();
    for s in secrets.iter().map(|s| s.trim()).filter(|s| s.len() >= 8) {
        out = out.replace(s, REDACTED);
    }
    redact_tokens(&out)
}

fn redact_tokens(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(TOKEN_PREFIX) {
        let after = &rest[i + TOKEN_PREFIX.len()..];
        let end = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .unwrap_or(after.len());
        out.push_str(&rest[..i]);
        out.push_str(TOKEN_PREFIX);
        if end > 0 {
            out.push_str(REDACTED);
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_tokens_go_the_rest_stays() {
        let key = "cGrivateKeyPrivateKeyPrivateKeyPrivateKey00=".to_owned();
        let text = format!(
            "private_key = {key}\njoin with meshd1.AAAAbbbb-_cc99 now\nkey again: {key}.\n\
             meshd1. alone, short: abc"
        );
        let r = redact(&text, &[format!("{key}\n"), "abc".into()]);
        assert!(!r.contains(&key), "{r}");
        assert!(!r.contains("AAAAbbbb"), "{r}");
        assert_eq!(
            r,
            "private_key = <redacted>\njoin with meshd1.<redacted> now\nkey again: <redacted>.\n\
             meshd1. alone, short: abc"
        );
    }

    proptest::proptest! {
        /// Whatever surrounds them, a secret and a token never survive.
        #[test]
        fn nothing_survives(pre in ".{0,40}", mid in ".{0,40}", post in ".{0,40}") {
            let key = "k3yK3yk3yK3yk3yK3yk3yK3yk3yK3yk3yK3yk3yK3y=";
            let token = "meshd1.Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZg";
            let text = format!("{pre}{key}{mid}{token}{post}");
            let r = redact(&text, &[key.to_owned()]);
            proptest::prop_assert!(!r.contains(key));
            proptest::prop_assert!(!r.contains("Zm9vYmFyYmF6cXV4"));
        }
    }
}
