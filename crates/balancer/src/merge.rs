//! Merging the responses of a forked REGISTER (RFC 3261 §16.7 steps 6-7).
//! Pure: which final response goes back, and the challenges it carries.

/// Picks the best final response: a 2xx is forwarded at once (not here);
/// otherwise a 6xx if any, else the lowest class, preferring 401/407 within
/// 4xx (so the UA can authenticate), else the lowest code.
#[must_use]
pub fn best(codes: &[u16]) -> Option<usize> {
    if let Some(i) = codes.iter().position(|&c| (600..700).contains(&c)) {
        return Some(i);
    }
    let class = codes
        .iter()
        .map(|&c| c / 100)
        .filter(|&c| (2..=5).contains(&c))
        .min()?;
    let in_class = |c: u16| c / 100 == class;
    codes
        .iter()
        .enumerate()
        .filter(|&(_, &c)| in_class(c))
        .min_by_key(|&(_, &c)| (!matches!(c, 401 | 407), c))
        .map(|(i, _)| i)
}

/// The status to send for the chosen one: a 503 becomes 500 (§16.7 step 6),
/// since the UA should not take the pool as unavailable because one server is.
#[must_use]
pub fn outgoing_status(code: u16) -> u16 {
    if code == 503 { 500 } else { code }
}

/// Rewrites the status code of a response (`SIP/2.0 NNN ...`) received
/// with `code` to [`outgoing_status`].
pub fn set_outgoing_status(response: &mut [u8], code: u16) {
    let out = outgoing_status(code);
    if out != code && response.len() >= 11 {
        let digits = [
            b'0' + (out / 100) as u8,
            b'0' + (out / 10 % 10) as u8,
            b'0' + (out % 10) as u8,
        ];
        response[8..11].copy_from_slice(&digits);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice() {
        assert_eq!(best(&[]), None);
        assert_eq!(best(&[503, 404]), Some(1));
        assert_eq!(best(&[404, 401, 407]), Some(1));
        assert_eq!(best(&[407, 500]), Some(0));
        assert_eq!(best(&[486, 603, 200]), Some(1), "6xx wins");
        assert_eq!(best(&[302, 404]), Some(0));
        assert_eq!(best(&[500, 503]), Some(0));
        assert_eq!(outgoing_status(503), 500);
        assert_eq!(outgoing_status(401), 401);
        let mut r = b"SIP/2.0 503 Service Unavailable\r\n".to_vec();
        set_outgoing_status(&mut r, 503);
        assert!(r.starts_with(b"SIP/2.0 500 "));
    }
}
