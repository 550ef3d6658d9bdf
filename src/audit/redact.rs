//! Masking of direct identifiers in Chinese and English text for
//! `audit.text = "redacted"`: e-mail addresses, Chinese resident ID numbers,
//! bank card numbers (Luhn-checked) and phone numbers (Chinese mobile and
//! landline, `+86`, international and North American formats).
//!
//! Digits are matched as ASCII `[0-9]` on purpose: the regex crate's `\d`
//! and `\b` are Unicode-aware, and Chinese characters count as word
//! characters, so `\b` never fires between `号` and `1`. Boundaries are
//! checked by hand instead: a match must not be glued to further digits.
//!
//! Masking is biased toward privacy: an 18-digit run shaped like an ID is
//! masked without checking its checksum, and any 10-digit run that looks
//! like a phone number is masked.

use std::sync::OnceLock;

use regex::Regex;

/// Placeholder for a masked e-mail address.
pub const EMAIL: &str = "[EMAIL]";
/// Placeholder for a masked ID number.
pub const ID: &str = "[ID]";
/// Placeholder for a masked bank card number.
pub const CARD: &str = "[CARD]";
/// Placeholder for a masked phone number.
pub const PHONE: &str = "[PHONE]";

struct Patterns {
    email: Regex,
    id: Regex,
    card: Regex,
    phone: Regex,
}

fn patterns() -> &'static Patterns {
    static P: OnceLock<Patterns> = OnceLock::new();
    P.get_or_init(|| Patterns {
        email: compile(r"(?i)[a-z0-9._%+\-]+@[a-z0-9\-]+(?:\.[a-z0-9\-]+)*\.[a-z]{2,}"),
        id: compile(
            r"[1-9][0-9]{5}(?:18|19|20)[0-9]{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])[0-9]{3}[0-9Xx]",
        ),
        card: compile(r"[0-9](?:[ \-]?[0-9]){12,18}"),
        phone: compile(concat!(
            // +86 / 0086 and Chinese mobile numbers, 3-4-4 grouping allowed
            r"(?:(?:\+|00)86[ \-]?)?1[3-9][0-9](?:[ \-]?[0-9]{4}){2}",
            // Chinese landline with area code: 010-12345678, (0755)88889999
            r"|\(?0[1-9][0-9]{1,2}\)?[ \-]?[0-9]{7,8}(?:-[0-9]{1,5})?",
            // international: +44 20 7946 0958, 0049 30 1234567
            r"|(?:\+|00)[1-9][0-9]{0,2}(?:[ \-.]?\(?[0-9]{1,4}\)?){2,5}",
            // North American: (415) 555-1234, 415.555.1234, +1 415 555 1234
            r"|(?:\+?1[ .\-]?)?\(?[2-9][0-9]{2}\)?[ .\-]?[0-9]{3}[ .\-]?[0-9]{4}",
        )),
    })
}

fn compile(re: &str) -> Regex {
    // The patterns are constants covered by the tests below.
    match Regex::new(re) {
        Ok(r) => r,
        Err(e) => unreachable!("built-in redaction pattern does not compile: {e}"),
    }
}

/// Mask identifiers in `text`. Idempotent: masking masked text changes
/// nothing.
pub fn redact(text: &str) -> String {
    let p = patterns();
    let t = p.email.replace_all(text, EMAIL);
    let t = mask(&t, &p.id, ID, |_| true);
    let t = mask(&t, &p.card, CARD, luhn_ok);
    mask(&t, &p.phone, PHONE, |m| {
        let digits = m.bytes().filter(u8::is_ascii_digit).count();
        (7..=15).contains(&digits)
    })
}

/// Replace matches of `re` that are not glued to further digits and that
/// `accept` likes.
fn mask(text: &str, re: &Regex, label: &str, accept: impl Fn(&str) -> bool) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for m in re.find_iter(text) {
        let before = text[..m.start()].chars().next_back();
        let after = text[m.end()..].chars().next();
        let glued_before = before.is_some_and(|c| c.is_ascii_digit() || c == '+');
        let glued_after = after.is_some_and(|c| c.is_ascii_digit());
        if glued_before || glued_after || !accept(m.as_str()) {
            continue;
        }
        out.push_str(&text[last..m.start()]);
        out.push_str(label);
        last = m.end();
    }
    out.push_str(&text[last..]);
    out
}

/// Luhn checksum over the ASCII digits of `s`.
fn luhn_ok(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    sum % 10 == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, want: &str) {
        assert_eq!(redact(input), want, "input: {input}");
        assert_eq!(redact(want), want, "idempotent on: {want}");
    }

    #[test]
    fn chinese_text() {
        check(
            "我的手机号是13812345678，有事打我",
            "我的手机号是[PHONE]，有事打我",
        );
        check(
            "电话 138 1234 5678 或 +86 139-1234-5678",
            "电话 [PHONE] 或 [PHONE]",
        );
        check("座机010-12345678转分机", "座机[PHONE]转分机");
        check("(0755)88889999", "[PHONE]");
        check(
            "身份证号11010519491231002X，别告诉别人",
            "身份证号[ID]，别告诉别人",
        );
        check("身份证 110105194912310021", "身份证 [ID]");
        check("邮箱是zhang.san@qq.com谢谢", "邮箱是[EMAIL]谢谢");
        check("卡号6222 0212 3456 7894 请转账", "卡号[CARD] 请转账");
    }

    #[test]
    fn english_text() {
        check(
            "Call me at (415) 555-1234 tonight",
            "Call me at [PHONE] tonight",
        );
        check(
            "or 415.555.1234 or +1 415 555 1234",
            "or [PHONE] or [PHONE]",
        );
        check("UK: +44 20 7946 0958.", "UK: [PHONE].");
        check("mail John.Doe+x@example.co.uk now", "mail [EMAIL] now");
        check("card 4111 1111 1111 1111 exp", "card [CARD] exp");
        check("card 4111-1111-1111-1111", "card [CARD]");
    }

    #[test]
    fn leaves_ordinary_numbers_alone() {
        for s in [
            "I slept 8 hours and cried 3 times",
            "2023年10月12日我去了医院",
            "2023-10-12",
            "我花了15000元",
            "room 1234",
            "4111 1111 1111 1112 fails Luhn and has 16 digits",
            "订单号 123456789012345678901234",
        ] {
            assert_eq!(redact(s), s, "should not change: {s}");
        }
    }

    #[test]
    fn luhn() {
        assert!(luhn_ok("4111111111111111"));
        assert!(luhn_ok("6222021234567894"));
        assert!(!luhn_ok("4111111111111112"));
        assert!(!luhn_ok("411111"));
    }
}
