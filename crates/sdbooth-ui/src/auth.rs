//! Who may talk to the UI: the holder of the random token printed at start-up (as Jupyter does).
//!
//! - The token comes as `?token=` once (the printed URL; the answer sets a cookie for the next
//!   requests), as the cookie, or as the `X-Sdbooth-Token` / `Authorization: Bearer` header.
//!   Anything else gets 401.
//! - The Host header must name the address the UI listens on (127.0.0.1, localhost, [::1] or the
//!   --host given, with the port): a page on another site whose name was re-pointed at 127.0.0.1
//!   (DNS rebinding) sends its own name and gets 403.
//! - A request that changes something is a POST carrying the token in the header: another site
//!   can make the browser send the cookie, but cannot set that header (no CSRF).

use std::net::IpAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::RngCore;

use crate::AppState;

pub const TOKEN_HEADER: &str = "x-sdbooth-token";

/// 32 hex digits from the OS's random source.
pub fn new_token() -> String {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether a Host header names this server: `localhost` or an IP literal, with our port. A
/// rebinding attack needs a DNS name of its own, so any other name is refused; IP literals are
/// accepted so that a UI bound to 0.0.0.0 with `--host` is reachable by the machine's address.
pub fn host_allowed(host_header: &str, port: u16) -> bool {
    let Some((name, given_port)) = host_header.rsplit_once(':') else { return false };
    if given_port.parse::<u16>().ok() != Some(port) {
        return false;
    }
    let name = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(name);
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok()
}

fn cookie_name(port: u16) -> String {
    // One cookie per port: two UIs on one machine do not overwrite each other's token.
    format!("sdbooth_token_{port}")
}

/// Compares without stopping at the first different byte (no timing hint about the token).
fn same_token(given: &str, token: &str) -> bool {
    given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

fn header_token(req: &Request) -> Option<&str> {
    let h = req.headers();
    if let Some(v) = h.get(TOKEN_HEADER).and_then(|v| v.to_str().ok()) {
        return Some(v);
    }
    h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
}

fn query_token(req: &Request) -> Option<&str> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix("token="))
}

fn cookie_token<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.headers().get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|cookies| {
        cookies.split(';').find_map(|c| c.trim().strip_prefix(name).and_then(|rest| rest.strip_prefix('=')))
    })
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{message}\n")).into_response()
}

/// The middleware in front of every route.
pub async fn guard(State(state): State<Arc<AppState>>, req: Request<Body>, next: Next) -> Response {
    let token = state.token.as_str();
    let from_header = header_token(&req).is_some_and(|t| same_token(t, token));
    let from_query = query_token(&req).is_some_and(|t| same_token(t, token));
    let from_cookie = cookie_token(&req, &cookie_name(state.port)).is_some_and(|t| same_token(t, token));
    if !(from_header || from_query || from_cookie) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "401: this sdbooth UI needs its access token: open the URL that `sdbooth ui` printed",
        );
    }
    let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !host_allowed(host, state.port) {
        return refuse(StatusCode::FORBIDDEN, &format!("403: Host {host:?} is not this server's address"));
    }
    let reads_only = req.method() == Method::GET || req.method() == Method::HEAD;
    if !reads_only && !from_header {
        return refuse(
            StatusCode::FORBIDDEN,
            "403: a request that changes something must carry the token in the X-Sdbooth-Token header",
        );
    }
    let mut response = next.run(req).await;
    if from_query && !from_cookie {
        let cookie = format!("{}={token}; Path=/; HttpOnly; SameSite=Strict", cookie_name(state.port));
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            response.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_long() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }

    #[test]
    fn token_comparison() {
        assert!(same_token("abc", "abc"));
        assert!(!same_token("abd", "abc"));
        assert!(!same_token("ab", "abc"));
    }

    #[test]
    fn host_check() {
        for ok in ["127.0.0.1:7861", "localhost:7861", "LOCALHOST:7861", "[::1]:7861", "10.1.2.3:7861"] {
            assert!(host_allowed(ok, 7861), "{ok}");
        }
        for bad in ["evil.example:7861", "127.0.0.1:80", "127.0.0.1", "", "localhost.evil.example:7861"] {
            assert!(!host_allowed(bad, 7861), "{bad}");
        }
    }
}
