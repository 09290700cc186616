//! The client side of SCRAM (RFC 5802) with SHA-256 and SHA-512 (RFC 7677), as Kafka's SASL
//! carries it: no channel binding (gs2 header `n,,`), no authorization id, no extensions.
//!
//! Pure message handling, no I/O: [`ScramClient::client_first`], then
//! [`ScramClient::client_final`] with the server's first message, then
//! [`ScramFinal::verify`] with the server's final message. The last step is what makes SCRAM
//! mutual: a server that does not know the password's keys cannot produce the signature, so a
//! connection is used only once the broker has proven who it is, not merely accepted the
//! client.
//!
//! Names and passwords are used as their UTF-8 bytes, without SASLprep: Kafka's own SCRAM
//! (`ScramFormatter`) does the same, and the credentials must hash as the broker hashed them.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256, Sha512};

/// Fewest PBKDF2 iterations accepted from a server: RFC 7677's floor, and Kafka's own minimum.
/// A server asking for fewer is refused (it would make a stolen exchange cheap to brute-force).
pub const MIN_ITERATIONS: u32 = 4096;
/// Most PBKDF2 iterations accepted from a server (Kafka stores at most 16384): a server asking
/// for more is refused rather than let it make the adapter spin.
pub const MAX_ITERATIONS: u32 = 65_536;
/// Longest server message accepted, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// Client nonce length, in random bytes (base64-encoded on the wire).
const NONCE_BYTES: usize = 24;

/// HMAC-`$hash` of `$data` under `$key`, not yet finalized (a macro: the digest crates' trait
/// bounds make a generic function longer than the two uses).
macro_rules! mac {
    ($hash:ty, $key:expr, $data:expr) => {{
        let mut mac =
            <Hmac<$hash> as hmac::digest::KeyInit>::new_from_slice($key).expect("HMAC takes keys of any length");
        mac.update($data);
        mac
    }};
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScramHash {
    Sha256,
    Sha512,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("the server's SCRAM message is malformed: {0}")]
    Malformed(String),
    #[error("the server's SCRAM nonce does not extend the client's")]
    Nonce,
    #[error("the server asks for {0} PBKDF2 iterations; accepted: {MIN_ITERATIONS} to {MAX_ITERATIONS}")]
    Iterations(u32),
    #[error("the server ended the SCRAM exchange with error {0:?}")]
    Server(String),
    #[error(
        "the server's SCRAM signature is wrong: it does not hold this user's credentials (not the broker it claims to be?)"
    )]
    ServerSignature,
}

/// One SCRAM exchange, from the client's first message on.
pub struct ScramClient {
    hash: ScramHash,
    nonce: String,
    /// `n=<user>,r=<nonce>`: part of the AuthMessage both sides sign.
    first_bare: String,
}

/// What the client expects of the server's final message.
pub struct ScramFinal {
    hash: ScramHash,
    server_key: Vec<u8>,
    auth_message: String,
}

impl ScramClient {
    /// An exchange for `username` with a fresh random nonce.
    pub fn new(hash: ScramHash, username: &str) -> ScramClient {
        use rand::RngCore;
        let mut nonce = [0u8; NONCE_BYTES];
        rand::rng().fill_bytes(&mut nonce);
        ScramClient::with_nonce(hash, username, BASE64.encode(nonce))
    }

    /// An exchange with the given nonce (printable ASCII without ','): for tests against
    /// published exchanges.
    pub fn with_nonce(hash: ScramHash, username: &str, nonce: String) -> ScramClient {
        let first_bare = format!("n={},r={nonce}", escape(username));
        ScramClient { hash, nonce, first_bare }
    }

    /// The client-first-message.
    pub fn client_first(&self) -> String {
        format!("n,,{}", self.first_bare)
    }

    /// The client-final-message answering `server_first`, and what the server's final message
    /// must prove. Checks the server's nonce and iteration count first.
    pub fn client_final(&self, password: &str, server_first: &[u8]) -> Result<(String, ScramFinal), ScramError> {
        let server_first = message(server_first)?;
        let mut fields = server_first.split(',');
        if server_first.starts_with("m=") {
            return Err(ScramError::Malformed("a mandatory extension (m=) the client does not know".into()));
        }
        let nonce = field(fields.next(), 'r')?;
        let salt = field(fields.next(), 's')?;
        let iterations = field(fields.next(), 'i')?;
        // Anything after is an optional extension, which a client ignores.
        if !(nonce.len() > self.nonce.len() && nonce.starts_with(&self.nonce)) {
            return Err(ScramError::Nonce);
        }
        if !nonce.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',') {
            return Err(ScramError::Malformed("the nonce is not printable ASCII".into()));
        }
        let salt = BASE64.decode(salt).map_err(|e| ScramError::Malformed(format!("salt: {e}")))?;
        if salt.is_empty() {
            return Err(ScramError::Malformed("empty salt".into()));
        }
        let iterations: u32 =
            iterations.parse().map_err(|_| ScramError::Malformed(format!("iteration count {iterations:?}")))?;
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
            return Err(ScramError::Iterations(iterations));
        }

        let h = self.hash;
        let salted = hi(h, password.as_bytes(), &salt, iterations);
        let client_key = hmac(h, &salted, b"Client Key");
        let stored_key = digest(h, &client_key);
        // "biws" is base64("n,,"): the gs2 header, no channel binding.
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.first_bare);
        let signature = hmac(h, &stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(&signature).map(|(k, s)| k ^ s).collect();
        let server_key = hmac(h, &salted, b"Server Key");
        let final_message = format!("{without_proof},p={}", BASE64.encode(proof));
        Ok((final_message, ScramFinal { hash: h, server_key, auth_message }))
    }
}

impl ScramFinal {
    /// Checks the server-final-message: its signature (compared in constant time), or the
    /// error it reports.
    pub fn verify(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let server_final = message(server_final)?;
        let first = server_final.split(',').next().unwrap_or_default();
        if let Some(error) = first.strip_prefix("e=") {
            return Err(ScramError::Server(error.to_string()));
        }
        let signature = first
            .strip_prefix("v=")
            .ok_or_else(|| ScramError::Malformed(format!("a final message without v= or e=: {first:?}")))?;
        let signature =
            BASE64.decode(signature).map_err(|e| ScramError::Malformed(format!("server signature: {e}")))?;
        let verified = match self.hash {
            ScramHash::Sha256 => mac!(Sha256, &self.server_key, self.auth_message.as_bytes()).verify_slice(&signature),
            ScramHash::Sha512 => mac!(Sha512, &self.server_key, self.auth_message.as_bytes()).verify_slice(&signature),
        };
        verified.map_err(|_| ScramError::ServerSignature)
    }
}

fn message(bytes: &[u8]) -> Result<&str, ScramError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(ScramError::Malformed(format!("{} bytes; at most {MAX_MESSAGE_BYTES}", bytes.len())));
    }
    std::str::from_utf8(bytes).map_err(|_| ScramError::Malformed("not UTF-8".into()))
}

/// The value of attribute `name` (`<name>=<value>`).
fn field(part: Option<&str>, name: char) -> Result<&str, ScramError> {
    part.and_then(|p| p.strip_prefix(name)?.strip_prefix('='))
        .ok_or_else(|| ScramError::Malformed(format!("expected the {name}= attribute, found {part:?}")))
}

/// A username as a SCRAM saslname: ',' and '=' escaped.
fn escape(username: &str) -> String {
    username.replace('=', "=3D").replace(',', "=2C")
}

fn hmac(h: ScramHash, key: &[u8], data: &[u8]) -> Vec<u8> {
    match h {
        ScramHash::Sha256 => mac!(Sha256, key, data).finalize().into_bytes().to_vec(),
        ScramHash::Sha512 => mac!(Sha512, key, data).finalize().into_bytes().to_vec(),
    }
}

fn digest(h: ScramHash, data: &[u8]) -> Vec<u8> {
    match h {
        ScramHash::Sha256 => Sha256::digest(data).to_vec(),
        ScramHash::Sha512 => Sha512::digest(data).to_vec(),
    }
}

/// RFC 5802's Hi(): PBKDF2 with HMAC of the hash, one block of the hash's length.
fn hi(h: ScramHash, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
    match h {
        ScramHash::Sha256 => {
            let mut out = [0u8; 32];
            pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
            out.to_vec()
        }
        ScramHash::Sha512 => {
            let mut out = [0u8; 64];
            pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, iterations, &mut out);
            out.to_vec()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677, section 3: user "user", password "pencil".
    const NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const SERVER_FIRST: &str = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &str =
        "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_client() -> ScramClient {
        ScramClient::with_nonce(ScramHash::Sha256, "user", NONCE.into())
    }

    #[test]
    fn the_rfc_7677_exchange_is_reproduced() {
        let client = rfc_client();
        assert_eq!(client.client_first(), "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let (last, expected) = client.client_final("pencil", SERVER_FIRST.as_bytes()).unwrap();
        assert_eq!(last, CLIENT_FINAL);
        assert_eq!(expected.verify(SERVER_FINAL.as_bytes()), Ok(()));
    }

    #[test]
    fn a_server_that_does_not_know_the_password_is_refused() {
        // The same exchange with another password: the real server's signature does not match.
        let (_, expected) = rfc_client().client_final("pencil2", SERVER_FIRST.as_bytes()).unwrap();
        assert_eq!(expected.verify(SERVER_FINAL.as_bytes()), Err(ScramError::ServerSignature));
        let (_, expected) = rfc_client().client_final("pencil", SERVER_FIRST.as_bytes()).unwrap();
        assert_eq!(expected.verify(b"e=invalid-proof"), Err(ScramError::Server("invalid-proof".into())));
        assert!(matches!(expected.verify(b"x=1"), Err(ScramError::Malformed(_))));
        assert_eq!(expected.verify(b"v=AAAA"), Err(ScramError::ServerSignature));
    }

    #[test]
    fn the_servers_first_message_is_checked() {
        let c = rfc_client();
        let answer = |m: &str| c.client_final("pencil", m.as_bytes()).err();
        assert_eq!(answer("r=someoneelse123,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"), Some(ScramError::Nonce));
        assert_eq!(answer("r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"), Some(ScramError::Nonce));
        assert_eq!(answer("r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=1"), Some(ScramError::Iterations(1)));
        assert_eq!(
            answer("r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=100000000"),
            Some(ScramError::Iterations(100_000_000))
        );
        for malformed in [
            "m=ext,r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            "r=rOprNGfwEbeRWgbNEkqOx,i=4096",
            "r=rOprNGfwEbeRWgbNEkqOx,s=!!!,i=4096",
            "r=rOprNGfwEbeRWgbNEkqOx,s=,i=4096",
            "r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=many",
        ] {
            assert!(matches!(answer(malformed), Some(ScramError::Malformed(_))), "{malformed}");
        }
        let huge = "r=".to_string() + &"x".repeat(MAX_MESSAGE_BYTES);
        assert!(matches!(answer(&huge), Some(ScramError::Malformed(_))));
        // Extensions after the iteration count are ignored.
        assert!(answer(&format!("{SERVER_FIRST},x=extension")).is_none());
    }

    #[test]
    fn names_are_escaped_and_nonces_fresh() {
        let c = ScramClient::new(ScramHash::Sha512, "a=b,c");
        assert!(c.client_first().starts_with("n,,n=a=3Db=2Cc,r="), "{}", c.client_first());
        let d = ScramClient::new(ScramHash::Sha512, "a=b,c");
        assert_ne!(c.nonce, d.nonce);
        assert_eq!(c.nonce.len(), 32);
        assert!(!c.nonce.contains(','));
    }

    /// SHA-512 has no published exchange: a server computed from the RFC's definitions, with
    /// PBKDF2 written out from its own definition, must accept the proof and sign back.
    #[test]
    fn a_sha_512_exchange_verifies_against_an_independent_server() {
        use hmac::Mac;
        let salt = b"kafka-salt-bytes";
        let client = ScramClient::with_nonce(ScramHash::Sha512, "pledge", "clientnonce".into());
        let server_first = format!("r=clientnonceSERVER,s={},i=4096", BASE64.encode(salt));
        let (last, expected) = client.client_final("pw", server_first.as_bytes()).unwrap();

        // The server's side: SaltedPassword, then the keys, from the definitions.
        let mut salted = [0u8; 64];
        pbkdf2_by_definition(b"pw", salt, 4096, &mut salted);
        let hm = |key: &[u8], data: &[u8]| {
            let mut m = <Hmac<Sha512> as hmac::digest::KeyInit>::new_from_slice(key).unwrap();
            m.update(data);
            m.finalize().into_bytes().to_vec()
        };
        let client_key = hm(&salted, b"Client Key");
        let stored_key = Sha512::digest(&client_key).to_vec();
        let without_proof = "c=biws,r=clientnonceSERVER";
        let auth = format!("n=pledge,r=clientnonce,{server_first},{without_proof}");
        let proof = BASE64.decode(last.strip_prefix(&format!("{without_proof},p=")).unwrap()).unwrap();
        let signature = hm(&stored_key, auth.as_bytes());
        let recovered: Vec<u8> = proof.iter().zip(&signature).map(|(p, s)| p ^ s).collect();
        assert_eq!(Sha512::digest(&recovered).to_vec(), stored_key, "the server accepts the proof");
        let server_signature = hm(&hm(&salted, b"Server Key"), auth.as_bytes());
        assert_eq!(expected.verify(format!("v={}", BASE64.encode(server_signature)).as_bytes()), Ok(()));
    }

    fn pbkdf2_by_definition(password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        // PBKDF2 by its definition (RFC 8018, one block): U1 = PRF(P, S || INT(1)), Ui = PRF(P, Ui-1).
        use hmac::Mac;
        let prf = |data: &[u8]| {
            let mut m = <Hmac<Sha512> as hmac::digest::KeyInit>::new_from_slice(password).unwrap();
            m.update(data);
            m.finalize().into_bytes().to_vec()
        };
        let mut u = prf(&[salt, &1u32.to_be_bytes()].concat());
        let mut t = u.clone();
        for _ in 1..iterations {
            u = prf(&u);
            t.iter_mut().zip(&u).for_each(|(t, u)| *t ^= u);
        }
        out.copy_from_slice(&t);
    }
}
