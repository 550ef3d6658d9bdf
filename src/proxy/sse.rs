//! Server-sent events: an incremental decoder for the upstream's stream and
//! the encoder for what the gateway sends.
//!
//! The decoder follows the WHATWG event-stream rules that matter for
//! OpenAI-style streams: lines end in `\n`, `\r\n` or `\r`; `data:` lines
//! (one optional space after the colon) are joined with `\n`; a blank line
//! dispatches the event; `:` comment lines and other fields are ignored.
//! "Incomplete" is a normal state: bytes can be split anywhere, including
//! inside a UTF-8 sequence or between `\r` and `\n`.

use bytes::{Bytes, BytesMut};

/// One decoded event's `data` payload (e.g. a chunk's JSON or `[DONE]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub data: String,
}

/// Why the byte stream is not a valid event stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("event data is not valid UTF-8")]
    InvalidUtf8,
    #[error("a single event is larger than {0} bytes")]
    TooLarge(usize),
}

/// Incremental decoder: feed bytes, take complete events.
#[derive(Debug)]
pub struct SseDecoder {
    buf: BytesMut,
    data: Vec<u8>,
    has_data: bool,
    /// A `\r` ended the previous line; a `\n` right after it belongs to it.
    after_cr: bool,
    max_event_bytes: usize,
}

impl Default for SseDecoder {
    fn default() -> Self {
        SseDecoder::new(4 * 1024 * 1024)
    }
}

impl SseDecoder {
    /// A decoder refusing single events larger than `max_event_bytes`.
    pub fn new(max_event_bytes: usize) -> SseDecoder {
        SseDecoder {
            buf: BytesMut::new(),
            data: Vec::new(),
            has_data: false,
            after_cr: false,
            max_event_bytes,
        }
    }

    /// Add bytes and return every event they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            if self.after_cr && !self.buf.is_empty() {
                if self.buf[0] == b'\n' {
                    let _ = self.buf.split_to(1);
                }
                self.after_cr = false;
            }
            let Some(pos) = self.buf.iter().position(|&b| b == b'\n' || b == b'\r') else {
                break;
            };
            let line = self.buf.split_to(pos);
            let term = self.buf.split_to(1);
            if term[0] == b'\r' {
                self.after_cr = true;
            }
            if let Some(ev) = self.line(&line)? {
                out.push(ev);
            }
        }
        if self.buf.len() + self.data.len() > self.max_event_bytes {
            return Err(SseError::TooLarge(self.max_event_bytes));
        }
        Ok(out)
    }

    /// End of input: a final event without its blank line still counts
    /// (servers that close right after the last `data:` line).
    pub fn finish(&mut self) -> Result<Option<SseEvent>, SseError> {
        if !self.buf.is_empty() {
            let line = std::mem::take(&mut self.buf);
            if let Some(ev) = self.line(&line)? {
                return Ok(Some(ev));
            }
        }
        self.dispatch()
    }

    fn line(&mut self, line: &[u8]) -> Result<Option<SseEvent>, SseError> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line[0] == b':' {
            return Ok(None);
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        if field == b"data" {
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
            self.has_data = true;
        }
        Ok(None)
    }

    fn dispatch(&mut self) -> Result<Option<SseEvent>, SseError> {
        if !self.has_data {
            return Ok(None);
        }
        self.has_data = false;
        let data = std::mem::take(&mut self.data);
        String::from_utf8(data)
            .map(|data| Some(SseEvent { data }))
            .map_err(|_| SseError::InvalidUtf8)
    }
}

/// Frame one `data:` event. JSON never contains raw newlines, but any that
/// appear are split into several `data:` lines as the format requires.
pub fn encode(data: &str) -> Bytes {
    let mut s = String::with_capacity(data.len() + 8);
    for line in data.split('\n') {
        s.push_str("data: ");
        s.push_str(line);
        s.push('\n');
    }
    s.push('\n');
    Bytes::from(s)
}

/// The stream terminator OpenAI clients wait for.
pub fn done() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(chunks: &[&[u8]]) -> Result<Vec<String>, SseError> {
        let mut d = SseDecoder::default();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(d.feed(c)?.into_iter().map(|e| e.data));
        }
        out.extend(d.finish()?.map(|e| e.data));
        Ok(out)
    }

    /// Every way of splitting `input` in two (and byte by byte) must give
    /// the same events as feeding it whole.
    fn check(input: &str, expected: &[&str]) {
        let bytes = input.as_bytes();
        let whole = decode_all(&[bytes]).expect("decodes");
        assert_eq!(whole, expected, "whole input {input:?}");
        for split in 0..=bytes.len() {
            let got = decode_all(&[&bytes[..split], &bytes[split..]]).expect("decodes");
            assert_eq!(got, expected, "split at {split} of {input:?}");
        }
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(
            decode_all(&singles).expect("decodes"),
            expected,
            "byte by byte {input:?}"
        );
    }

    #[test]
    fn openai_style_stream() {
        check(
            "data: {\"a\":1}\n\ndata: {\"b\":\"你好。\"}\n\ndata: [DONE]\n\n",
            &["{\"a\":1}", "{\"b\":\"你好。\"}", "[DONE]"],
        );
    }

    #[test]
    fn line_endings_crlf_and_cr() {
        check("data: x\r\n\r\ndata: y\r\rdata: z\n\n", &["x", "y", "z"]);
    }

    #[test]
    fn comments_other_fields_and_no_space() {
        check(
            ": keep-alive\n\nevent: message\nid: 7\ndata:tight\n\nretry: 10\n\n",
            &["tight"],
        );
    }

    #[test]
    fn multi_line_data_is_joined() {
        check("data: a\ndata: b\n\n", &["a\nb"]);
    }

    #[test]
    fn final_event_without_blank_line() {
        check("data: x\n\ndata: last", &["x", "last"]);
    }

    #[test]
    fn empty_data_field_is_an_event() {
        check("data\n\n", &[""]);
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        assert_eq!(decode_all(&[b"data: \xff\n\n"]), Err(SseError::InvalidUtf8));
    }

    #[test]
    fn oversized_event_is_an_error() {
        let mut d = SseDecoder::new(16);
        assert_eq!(d.feed(&[b'a'; 40]), Err(SseError::TooLarge(16)));
    }

    #[test]
    fn encode_round_trips() {
        let framed = encode("{\"x\":\"a\"}");
        assert_eq!(&framed[..], b"data: {\"x\":\"a\"}\n\n");
        let mut d = SseDecoder::default();
        let ev = d.feed(&encode("l1\nl2")).expect("decodes");
        assert_eq!(ev[0].data, "l1\nl2");
    }
}
