//! Console sign-in: a person pastes their API key into a form once; the server answers
//! with a random token in a cookie (`HttpOnly`, `SameSite=Strict`, `Max-Age`, path
//! `/console`, and `Secure` when `LORAPLEX_PUBLIC_URL` is https) and keeps, for that token only, the tenant, whether the key is an
//! operator's and the sign-in's CSRF token. The key itself is never stored, never put in
//! a URL and never sent back. Sign-ins live in memory (a restart signs everyone out) and
//! are bounded ([`MAX_LOGINS`]). Every state-changing form carries the CSRF token
//! ([`check_csrf`]).

use super::{page, ConsoleError};
use crate::api::Shared;
use crate::jobs::TenantId;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, Method};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use dashmap::DashMap;
use serde::Deserialize;
use std::time::{Duration, Instant};

/// The cookie's name.
pub const COOKIE: &str = "loraplex_console";
/// Sign-ins held at once; past it expired ones go, then the oldest.
pub const MAX_LOGINS: usize = 10_000;

/// One signed-in browser.
#[derive(Debug, Clone)]
pub struct Login {
    pub tenant: TenantId,
    pub operator: bool,
    pub csrf: String,
    expires: Instant,
}

/// The console's server-side state: sign-ins, and what the operator view samples.
pub struct ConsoleState {
    logins: DashMap<String, Login>,
    ttl: Duration,
    pub(crate) ops: super::operator::OpsHistory,
}

impl ConsoleState {
    pub fn new(ttl: Duration) -> Self {
        ConsoleState {
            logins: DashMap::new(),
            ttl: ttl.max(Duration::from_secs(1)),
            ops: Default::default(),
        }
    }

    fn insert(&self, tenant: TenantId, operator: bool) -> crate::Result<(String, Login)> {
        if self.logins.len() >= MAX_LOGINS {
            let now = Instant::now();
            self.logins.retain(|_, l| l.expires > now);
            while self.logins.len() >= MAX_LOGINS {
                let oldest = self
                    .logins
                    .iter()
                    .min_by_key(|e| e.value().expires)
                    .map(|e| e.key().clone());
                match oldest {
                    Some(k) => {
                        self.logins.remove(&k);
                    }
                    None => break,
                }
            }
        }
        let login = Login {
            tenant,
            operator,
            csrf: random_token()?,
            expires: Instant::now() + self.ttl,
        };
        let token = random_token()?;
        self.logins.insert(token.clone(), login.clone());
        Ok((token, login))
    }

    fn get(&self, token: &str) -> Option<Login> {
        let l = self.logins.get(token)?.clone();
        if l.expires <= Instant::now() {
            self.logins.remove(token);
            return None;
        }
        Some(l)
    }

    /// Sign-ins held now.
    pub fn len(&self) -> usize {
        self.logins.len()
    }

    pub fn is_empty(&self) -> bool {
        self.logins.is_empty()
    }
}

/// 32 random bytes as hex.
fn random_token() -> crate::Result<String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b)
        .map_err(|e| crate::Error::Unavailable(format!("no randomness for a sign-in: {e}")))?;
    Ok(hex::encode(b))
}

/// The signed-in caller of a console page. Without a valid cookie a page (GET) redirects
/// to the sign-in form and anything else is a 401.
pub struct Signed(pub Login);

impl FromRequestParts<Shared> for Signed {
    type Rejection = ConsoleError;

    async fn from_request_parts(parts: &mut Parts, s: &Shared) -> Result<Self, ConsoleError> {
        let login = cookie_token(parts).and_then(|t| s.console.get(&t));
        match login {
            Some(l) => {
                // A console page costs its tenant a request, like any API call.
                s.engine.quotas().admit_request(&l.tenant)?;
                Ok(Signed(l))
            }
            None if parts.method == Method::GET => Err(ConsoleError::SignIn),
            None => Err(ConsoleError::Api(crate::api::error::ApiError::Unauthorized)),
        }
    }
}

/// The operator signed in (an operator key); any other sign-in is a 403.
pub struct Operator(pub Login);

impl FromRequestParts<Shared> for Operator {
    type Rejection = ConsoleError;

    async fn from_request_parts(parts: &mut Parts, s: &Shared) -> Result<Self, ConsoleError> {
        let Signed(l) = Signed::from_request_parts(parts, s).await?;
        if !l.operator {
            return Err(ConsoleError::forbidden(
                "the operator view needs an operator key (marked `operator` in the keys file)",
            ));
        }
        Ok(Operator(l))
    }
}

fn cookie_token(parts: &Parts) -> Option<String> {
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A form's `csrf` field must be the sign-in's token (compared in constant time).
pub fn check_csrf(login: &Login, given: &str) -> Result<(), ConsoleError> {
    let (a, b) = (login.csrf.as_bytes(), given.as_bytes());
    let same = a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
    if same {
        Ok(())
    } else {
        Err(ConsoleError::forbidden(
            "the form's CSRF token is missing or stale: reload the page and try again",
        ))
    }
}

#[derive(Deserialize)]
pub struct SignIn {
    #[serde(default)]
    key: String,
}

#[derive(Deserialize)]
pub struct CsrfOnly {
    #[serde(default)]
    pub csrf: String,
}

pub async fn sign_in_page() -> Result<Response, ConsoleError> {
    Ok(page("sign_in.html", minijinja::context! { title => "Sign in" })?.into_response())
}

/// `POST /console/sign-in` (`key`): a cookie and a redirect to the runs, or the form again
/// with a 401.
pub async fn sign_in(
    State(s): State<Shared>,
    Form(f): Form<SignIn>,
) -> Result<Response, ConsoleError> {
    let key = f.key.trim();
    let Some(tenant) = s.auth.tenant(key) else {
        let mut r = page(
            "sign_in.html",
            minijinja::context! {
                title => "Sign in",
                error => "That API key is not known to this server.",
            },
        )?
        .into_response();
        *r.status_mut() = axum::http::StatusCode::UNAUTHORIZED;
        return Ok(r);
    };
    let operator = s.auth.is_operator(key);
    let (token, _) = s.console.insert(tenant.clone(), operator)?;
    tracing::info!(tenant = %tenant, operator, "console sign-in");
    // Behind HTTPS (a public URL that says so) the cookie never travels in the clear.
    let secure = s
        .cfg
        .public_url
        .as_deref()
        .is_some_and(|u| u.starts_with("https://"));
    let cookie = format!(
        "{COOKIE}={token}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{}",
        s.console.ttl.as_secs(),
        if secure { "; Secure" } else { "" }
    );
    let mut r = Redirect::to("/console").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(r)
}

/// `POST /console/sign-out` (`csrf`): the sign-in is forgotten and the cookie cleared.
pub async fn sign_out(
    State(s): State<Shared>,
    Signed(l): Signed,
    parts: axum::http::HeaderMap,
    Form(f): Form<CsrfOnly>,
) -> Result<Response, ConsoleError> {
    check_csrf(&l, &f.csrf)?;
    let token = parts
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned());
    if let Some(t) = token {
        s.console.logins.remove(&t);
    }
    let mut r = Redirect::to("/console/sign-in").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "loraplex_console=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    Ok(r)
}
