//! HTTP-01 answers: `GET /.well-known/acme-challenge/<token>` on the plain-HTTP listener.
//!
//! Tokens live in memory and in `certs_dir/.acme-challenges/`, so a replica sharing the
//! directory answers a validation request that lands on it rather than on the one ordering.

use std::path::PathBuf;

use dashmap::DashMap;

pub const PREFIX: &str = "/.well-known/acme-challenge/";

#[derive(Debug)]
pub struct Http01 {
    tokens: DashMap<String, String>,
    dir: PathBuf,
}

/// A token is base64url (RFC 8555 §8.3); anything else is never looked up, on disk least of all.
fn valid_token(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 256
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Http01 {
    pub fn new(certs_dir: &std::path::Path) -> Http01 {
        Http01 {
            tokens: DashMap::new(),
            dir: certs_dir.join(".acme-challenges"),
        }
    }

    /// Answers `token` from memory at once; the error says the file replicas read could not
    /// be written (this process still answers).
    pub fn add(&self, token: &str, key_authorization: &str) -> std::io::Result<()> {
        self.tokens
            .insert(token.to_owned(), key_authorization.to_owned());
        if !valid_token(token) {
            return Ok(());
        }
        let file = self.dir.join(token);
        std::fs::create_dir_all(&self.dir)
            .and_then(|()| crate::files::write_atomic(&file, key_authorization.as_bytes(), 0o644))
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", file.display())))
    }

    pub fn remove(&self, token: &str) {
        self.tokens.remove(token);
        if valid_token(token) {
            let _ = std::fs::remove_file(self.dir.join(token));
        }
    }

    /// The key authorization for a request path, if it is a challenge we (or a replica) set.
    pub async fn answer(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(PREFIX)?;
        if !valid_token(token) {
            return None;
        }
        if let Some(v) = self.tokens.get(token) {
            return Some(v.clone());
        }
        tokio::fs::read_to_string(self.dir.join(token)).await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokens_are_answered_from_memory_or_a_replicas_file_and_paths_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        let here = Http01::new(dir.path());
        let replica = Http01::new(dir.path());
        here.add("tok_1-A", "tok_1-A.thumb").unwrap();
        assert_eq!(
            here.answer("/.well-known/acme-challenge/tok_1-A")
                .await
                .as_deref(),
            Some("tok_1-A.thumb")
        );
        assert_eq!(
            replica
                .answer("/.well-known/acme-challenge/tok_1-A")
                .await
                .as_deref(),
            Some("tok_1-A.thumb")
        );
        assert_eq!(here.answer("/.well-known/acme-challenge/../x").await, None);
        assert_eq!(here.answer("/.well-known/acme-challenge/").await, None);
        here.remove("tok_1-A");
        assert_eq!(
            replica.answer("/.well-known/acme-challenge/tok_1-A").await,
            None
        );
    }

    #[tokio::test]
    async fn a_token_file_that_cannot_be_written_is_reported_and_memory_still_answers() {
        let dir = tempfile::tempdir().unwrap();
        // certs_dir is a file: `.acme-challenges/` cannot be made inside it.
        let not_a_dir = dir.path().join("certs");
        std::fs::write(&not_a_dir, b"").unwrap();
        let here = Http01::new(&not_a_dir);
        let err = here.add("tok", "tok.thumb").unwrap_err();
        assert!(err.to_string().contains(".acme-challenges"), "{err}");
        assert_eq!(
            here.answer("/.well-known/acme-challenge/tok")
                .await
                .as_deref(),
            Some("tok.thumb")
        );
    }
}
