//! Response bodies: one boxed type for everything the gateway sends, a body
//! fed by a channel (moderated streams), and small constructors.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::mpsc;

use crate::error::GatewayError;

/// Error type of response bodies (only pass-through bodies can fail).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every response body the gateway sends.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body whose frames come from a channel; it ends when every sender is
/// dropped. Dropping it (client gone) closes the channel, which the
/// moderation engine notices and stops the upstream call.
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl ChannelBody {
    pub fn new(rx: mpsc::Receiver<Bytes>) -> ChannelBody {
        ChannelBody { rx }
    }
}

impl HttpBody for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The one place a [`GatewayError`] becomes an HTTP response.
pub fn error_response(e: &GatewayError) -> Response<Body> {
    let mut r = json_response(e.status(), &e.body());
    if matches!(e, GatewayError::Unauthorized(_)) {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

pub fn sse_response(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    let mut r = Response::new(ChannelBody::new(rx).boxed_unsync());
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tell buffering reverse proxies (nginx) in front not to hold the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

pin_project_lite::pin_project! {
    /// A forwarded body that fails once the upstream's total time is up, so
    /// a pass-through stream cannot outlive `upstream.total_timeout_ms`.
    pub struct DeadlineBody<B> {
        #[pin]
        inner: B,
        #[pin]
        sleep: tokio::time::Sleep,
        ms: u64,
    }
}

impl<B> DeadlineBody<B> {
    pub fn new(
        inner: B,
        deadline: tokio::time::Instant,
        total: std::time::Duration,
    ) -> DeadlineBody<B> {
        DeadlineBody {
            inner,
            sleep: tokio::time::sleep_until(deadline),
            ms: total.as_millis() as u64,
        }
    }
}

impl<B> HttpBody for DeadlineBody<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if std::future::Future::poll(this.sleep, cx).is_ready() {
            let msg = format!(
                "upstream.total_timeout_ms ({} ms) reached mid-response",
                this.ms
            );
            return Poll::Ready(Some(Err(msg.into())));
        }
        this.inner.poll_frame(cx).map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
