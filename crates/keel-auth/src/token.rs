//! Auth tokens: `simple` (random strings every member learns through raft, expiring after a TTL
//! of disuse) and `jwt` (signed claims `username`, `revision`, `exp`; any member verifies them).
//!
//! Owns the token table; knows nothing of users or permissions.

use super::AuthInfo;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parking_lot::Mutex;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Most simple tokens kept at once; the oldest are dropped beyond it (memory stays bounded).
const MAX_SIMPLE_TOKENS: usize = 100_000;

pub enum Tokens {
    Simple(SimpleTokens),
    Jwt(Box<JwtTokens>),
}

pub struct SimpleTokens {
    ttl: Duration,
    table: Mutex<HashMap<String, (String, Instant)>>,
}

pub struct JwtTokens {
    alg: Algorithm,
    sign: Option<EncodingKey>,
    verify: DecodingKey,
    ttl: Duration,
}

#[derive(Serialize, Deserialize)]
struct Claims {
    username: String,
    revision: u64,
    exp: u64,
}

impl Tokens {
    /// Parses `--auth-token` (`simple` or `jwt,pub-key=...,priv-key=...,sign-method=...,ttl=...`).
    pub fn from_flag(opt: &str, simple_ttl: Duration) -> Result<Tokens, String> {
        let mut parts = opt.split(',');
        match parts.next().unwrap_or("") {
            "simple" | "" => Ok(Tokens::Simple(SimpleTokens { ttl: simple_ttl, table: Mutex::new(HashMap::new()) })),
            "jwt" => {
                let mut kv = HashMap::new();
                for p in parts {
                    let (k, v) = p.split_once('=').ok_or_else(|| format!("invalid auth token option {p:?}"))?;
                    kv.insert(k.to_string(), v.to_string());
                }
                JwtTokens::new(&kv).map(|j| Tokens::Jwt(Box::new(j)))
            }
            other => Err(format!("unknown token type {other:?} (want simple or jwt)")),
        }
    }

    pub fn is_simple(&self) -> bool {
        matches!(self, Tokens::Simple(_))
    }

    /// A fresh random simple token (16 letters, as etcd), unique to this member by a counter.
    pub fn new_simple_token(&self, seq: u64) -> String {
        let mut rng = rand::thread_rng();
        let letters: String = (0..16)
            .map(|_| {
                let i = rng.gen_range(0..52u8);
                (if i < 26 { b'a' + i } else { b'A' + i - 26 }) as char
            })
            .collect();
        format!("{letters}.{seq}")
    }

    /// Records a simple token for `user` (called when the authenticate entry is applied).
    pub fn assign_simple(&self, token: &str, user: &str) {
        if let Tokens::Simple(s) = self {
            let mut t = s.lock();
            let now = Instant::now();
            if t.len() >= MAX_SIMPLE_TOKENS {
                t.retain(|_, (_, exp)| *exp > now);
                if t.len() >= MAX_SIMPLE_TOKENS {
                    if let Some(oldest) = t.iter().min_by_key(|(_, (_, exp))| *exp).map(|(k, _)| k.clone()) {
                        t.remove(&oldest);
                    }
                }
            }
            t.insert(token.to_string(), (user.to_string(), now + s.ttl));
        }
    }

    /// Signs a JWT for `user` at auth `revision`.
    pub fn sign_jwt(&self, user: &str, revision: u64) -> Result<String, String> {
        match self {
            Tokens::Jwt(j) => j.sign(user, revision),
            Tokens::Simple(_) => Err("not a jwt token provider".into()),
        }
    }

    /// The caller a token names; `current_revision` for simple tokens (they follow the store).
    pub fn info(&self, token: &str, current_revision: u64) -> Option<AuthInfo> {
        match self {
            Tokens::Simple(s) => {
                let mut t = s.lock();
                let now = Instant::now();
                let entry = t.get_mut(token)?;
                if entry.1 <= now {
                    t.remove(token);
                    return None;
                }
                entry.1 = now + s.ttl;
                Some(AuthInfo { username: entry.0.clone(), revision: current_revision })
            }
            Tokens::Jwt(j) => j.verify(token),
        }
    }

    /// Forgets every simple token of `user` (user deleted or password changed).
    pub fn invalidate_user(&self, user: &str) {
        if let Tokens::Simple(s) = self {
            s.lock().retain(|_, (u, _)| u != user);
        }
    }

    /// Forgets every simple token (auth disabled).
    pub fn clear(&self) {
        if let Tokens::Simple(s) = self {
            s.lock().clear();
        }
    }
}

impl SimpleTokens {
    fn lock(&self) -> parking_lot::MutexGuard<'_, HashMap<String, (String, Instant)>> {
        self.table.lock()
    }
}

fn read(path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("read {path}: {e}"))
}

/// The public key PEM of a certificate (etcd accepts a certificate as `pub-key`).
fn public_key_der(pem: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let text = String::from_utf8_lossy(pem);
    if !text.contains("BEGIN CERTIFICATE") {
        return Ok(None);
    }
    let (_, p) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| format!("parse certificate: {e}"))?;
    let cert = p.parse_x509().map_err(|e| format!("parse certificate: {e}"))?;
    Ok(Some(cert.public_key().subject_public_key.data.to_vec()))
}

impl JwtTokens {
    fn new(opts: &HashMap<String, String>) -> Result<JwtTokens, String> {
        let method = opts.get("sign-method").ok_or("jwt: sign-method is required")?;
        let alg: Algorithm = method.parse().map_err(|_| format!("jwt: invalid sign-method {method:?}"))?;
        let ttl = match opts.get("ttl") {
            Some(t) => keel_config::parse_go_duration(t).ok_or_else(|| format!("jwt: invalid ttl {t:?}"))?,
            None => Duration::from_secs(300),
        };
        let rsa =
            matches!(alg, Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 | Algorithm::PS256 | Algorithm::PS384 | Algorithm::PS512);
        let ec = matches!(alg, Algorithm::ES256 | Algorithm::ES384);
        if !rsa && !ec {
            // HS* and EdDSA: a shared secret or keys in other formats; etcd 3.4 supports RS/PS/ES.
            return Err(format!("jwt: unsupported sign-method {method:?} (RS*, PS* and ES* are supported)"));
        }
        let sign = match opts.get("priv-key") {
            Some(p) => {
                let pem = read(p)?;
                Some(
                    if rsa { EncodingKey::from_rsa_pem(&pem) } else { EncodingKey::from_ec_pem(&pem) }
                        .map_err(|e| format!("jwt: priv-key {p}: {e}"))?,
                )
            }
            None => None,
        };
        let pub_path = opts.get("pub-key").ok_or("jwt: pub-key is required")?;
        let pem = read(pub_path)?;
        let verify = match public_key_der(&pem)? {
            Some(der) if rsa => DecodingKey::from_rsa_der(&der),
            Some(der) => DecodingKey::from_ec_der(&der),
            None if rsa => DecodingKey::from_rsa_pem(&pem).map_err(|e| format!("jwt: pub-key {pub_path}: {e}"))?,
            None => DecodingKey::from_ec_pem(&pem).map_err(|e| format!("jwt: pub-key {pub_path}: {e}"))?,
        };
        let j = JwtTokens { alg, sign, verify, ttl };
        if j.sign.is_some() {
            // The keys must belong together: a token we sign must verify.
            let t = j.sign("keel-key-check", 1)?;
            if j.verify(&t).is_none() {
                return Err("jwt: public and private keys don't match".into());
            }
        }
        Ok(j)
    }

    fn sign(&self, user: &str, revision: u64) -> Result<String, String> {
        let key = self.sign.as_ref().ok_or("jwt: token signing attempted with verify-only key")?;
        let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d + self.ttl).unwrap_or_default().as_secs();
        let claims = Claims { username: user.to_string(), revision, exp };
        jsonwebtoken::encode(&Header::new(self.alg), &claims, key).map_err(|e| format!("jwt: sign: {e}"))
    }

    fn verify(&self, token: &str) -> Option<AuthInfo> {
        let mut v = Validation::new(self.alg);
        v.leeway = 0;
        v.required_spec_claims = ["exp".to_string()].into_iter().collect();
        let data = jsonwebtoken::decode::<Claims>(token, &self.verify, &v).ok()?;
        Some(AuthInfo { username: data.claims.username, revision: data.claims.revision })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_tokens_expire_and_invalidate() {
        let t = Tokens::from_flag("simple", Duration::from_secs(300)).unwrap();
        let tok = t.new_simple_token(7);
        assert!(tok.ends_with(".7") && tok.len() == 18);
        assert!(t.info(&tok, 3).is_none());
        t.assign_simple(&tok, "alice");
        assert_eq!(t.info(&tok, 3), Some(AuthInfo { username: "alice".into(), revision: 3 }));
        t.invalidate_user("alice");
        assert!(t.info(&tok, 3).is_none());
        let short = Tokens::from_flag("simple", Duration::ZERO).unwrap();
        short.assign_simple("x.1", "bob");
        assert!(short.info("x.1", 1).is_none());
    }

    #[test]
    fn bad_jwt_options_are_refused() {
        assert!(Tokens::from_flag("jwt,sign-method=RS256", Duration::ZERO).is_err());
        assert!(Tokens::from_flag("jwt,pub-key=/nonexistent,sign-method=RS256", Duration::ZERO).is_err());
        assert!(Tokens::from_flag("opaque", Duration::ZERO).is_err());
    }
}
