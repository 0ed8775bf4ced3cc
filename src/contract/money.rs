//! Money as integers. Amounts travel as minor units (`u64`) everywhere inside
//! the worker; a provider's decimal string is made only at the wire edge, with
//! integer division and remainder, never through a float.

use serde::{Deserialize, Serialize};

/// An amount in minor units of an ISO 4217 currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Amount {
    /// Minor units: agorot, kuruş, cents.
    pub minor: u64,
    /// ISO 4217 alphabetic code, upper case.
    pub currency: String,
}

/// The number of fractional digits of a currency's minor unit.
///
/// Most currencies have two; the few exceptions that payment providers here
/// could meet are listed. Unknown codes are refused at validation, so this is
/// only asked for codes that passed [`is_known_currency`].
pub fn minor_digits(currency: &str) -> u32 {
    match currency {
        "JPY" | "KRW" | "CLP" | "ISK" | "VND" => 0,
        "BHD" | "JOD" | "KWD" | "OMR" | "TND" => 3,
        _ => 2,
    }
}

/// Currencies the worker accepts. A short allow-list beats accepting any three
/// letters: a typo in a currency must be refused before money moves.
pub fn is_known_currency(currency: &str) -> bool {
    const KNOWN: &[&str] = &[
        "ILS", "TRY", "USD", "EUR", "GBP", "CHF", "CAD", "AUD", "JPY", "KRW", "CLP", "ISK", "VND",
        "BHD", "JOD", "KWD", "OMR", "TND", "RUB", "SEK", "NOK", "DKK", "PLN", "CZK", "HUF", "RON",
        "BGN", "AED", "SAR",
    ];
    KNOWN.contains(&currency)
}

/// Formats minor units as a decimal string with the currency's fractional
/// digits: `1050` ILS → `"10.50"`, `7` → `"0.07"`, `500` JPY → `"500"`.
pub fn format_decimal(minor: u64, digits: u32) -> String {
    if digits == 0 {
        return minor.to_string();
    }
    let scale = 10u64.pow(digits);
    format!(
        "{}.{:0width$}",
        minor / scale,
        minor % scale,
        width = digits as usize
    )
}

/// Parses a provider's decimal string (`"10"`, `"10.5"`, `"10.50"`) into minor
/// units. Returns `None` for anything else: signs, exponents, too many
/// fractional digits, overflow.
pub fn parse_decimal(text: &str, digits: u32) -> Option<u64> {
    let (whole, frac) = match text.split_once('.') {
        Some((w, f)) => (w, f),
        None => (text, ""),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !all_digits(whole) || !all_digits(frac) || frac.len() > digits as usize {
        return None;
    }
    if text.contains('.') && frac.is_empty() {
        return None;
    }
    let scale = 10u64.checked_pow(digits)?;
    let whole: u64 = whole.parse().ok()?;
    let mut frac_value: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    for _ in frac.len()..digits as usize {
        frac_value *= 10;
    }
    whole.checked_mul(scale)?.checked_add(frac_value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_integer_arithmetic() {
        assert_eq!(format_decimal(1050, 2), "10.50");
        assert_eq!(format_decimal(1000, 2), "10.00");
        assert_eq!(format_decimal(7, 2), "0.07");
        assert_eq!(format_decimal(0, 2), "0.00");
        assert_eq!(format_decimal(500, 0), "500");
        assert_eq!(format_decimal(1234, 3), "1.234");
        assert_eq!(format_decimal(u64::MAX, 2), "184467440737095516.15");
    }

    #[test]
    fn parses_the_formats_hyp_documents() {
        // "for example, `10.00`, `10.5`, or `10`"
        assert_eq!(parse_decimal("10.00", 2), Some(1000));
        assert_eq!(parse_decimal("10.5", 2), Some(1050));
        assert_eq!(parse_decimal("10", 2), Some(1000));
        assert_eq!(parse_decimal("10.505", 2), None);
        assert_eq!(parse_decimal("-1", 2), None);
        assert_eq!(parse_decimal("1e3", 2), None);
        assert_eq!(parse_decimal("", 2), None);
        assert_eq!(parse_decimal("10.", 2), None);
        assert_eq!(parse_decimal(".5", 2), None);
    }

    #[test]
    fn formatted_amounts_parse_back_to_the_same_minor_units() {
        for minor in [0u64, 1, 99, 100, 1050, 123_456_789] {
            assert_eq!(parse_decimal(&format_decimal(minor, 2), 2), Some(minor));
        }
    }
}
