//! The review console's static assets, compiled into the binary so the page
//! works offline and behind strict egress rules (no CDN).

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

use super::bytes_response;

/// One embedded file.
pub struct Asset {
    content_type: &'static str,
    body: &'static str,
}

const INDEX: Asset = Asset {
    content_type: "text/html; charset=utf-8",
    body: include_str!("console/index.html"),
};
const JS: Asset = Asset {
    content_type: "text/javascript; charset=utf-8",
    body: include_str!("console/console.js"),
};
const CSS: Asset = Asset {
    content_type: "text/css; charset=utf-8",
    body: include_str!("console/console.css"),
};

/// The asset served at `path`, if any.
pub fn asset(path: &str) -> Option<&'static Asset> {
    match path {
        "/admin" | "/admin/" | "/admin/index.html" => Some(&INDEX),
        "/admin/console.js" => Some(&JS),
        "/admin/console.css" => Some(&CSS),
        _ => None,
    }
}

/// Serve an asset with a strict content security policy: only this
/// origin's script and style, no inline code, no framing.
pub fn serve(a: &Asset) -> Response<Full<Bytes>> {
    let mut resp = bytes_response(
        StatusCode::OK,
        a.content_type,
        Bytes::from_static(a.body.as_bytes()),
    );
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp
}
