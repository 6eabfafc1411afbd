//! Client certificate names: the subject Common Name (the participant id `fedmq certs` puts
//! there) of a certificate rustls has verified, read without an X.509 parser.

/// The subject Common Name of a DER certificate; `None` when absent, repeated, not a string
/// type, or the DER is malformed. Input is a certificate rustls has already verified.
pub(crate) fn common_name(der: &[u8]) -> Option<String> {
    /// (tag, content, rest) of the DER element at the start of `b`.
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, b) = b.split_first()?;
        let (&first, mut b) = b.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || b.len() < n {
                return None;
            }
            let len = b[..n]
                .iter()
                .fold(0usize, |acc, &x| (acc << 8) | usize::from(x));
            b = &b[n..];
            len
        };
        if b.len() < len {
            return None;
        }
        Some((tag, &b[..len], &b[len..]))
    }
    let (0x30, cert, _) = tlv(der)? else {
        return None;
    };
    let (0x30, mut tbs, _) = tlv(cert)? else {
        return None;
    };
    // version [0] (optional), serial, signature algorithm, issuer, validity, then subject.
    let mut skip = if tbs.first() == Some(&0xA0) { 5 } else { 4 };
    while skip > 0 {
        tbs = tlv(tbs)?.2;
        skip -= 1;
    }
    let (0x30, mut rdns, _) = tlv(tbs)? else {
        return None;
    };
    let mut found = None;
    while !rdns.is_empty() {
        let (0x31, mut set, rest) = tlv(rdns)? else {
            return None;
        };
        rdns = rest;
        while !set.is_empty() {
            let (0x30, attr, rest) = tlv(set)? else {
                return None;
            };
            set = rest;
            let (0x06, oid, value) = tlv(attr)? else {
                return None;
            };
            if oid == [0x55, 0x04, 0x03] {
                let (tag, v, _) = tlv(value)?;
                // UTF8String, PrintableString, TeletexString (as Latin-1 subset), IA5String.
                if !matches!(tag, 0x0C | 0x13 | 0x14 | 0x16) || found.is_some() {
                    return None;
                }
                found = Some(std::str::from_utf8(v).ok()?.to_string());
            }
        }
    }
    found
}
