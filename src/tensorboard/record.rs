//! TFRecord framing: `u64 length (LE)`, `u32 masked_crc32c(length)`, `data`, `u32 masked_crc32c(data)`.

/// CRC-32C (Castagnoli), reflected polynomial 0x82F63B78.
pub fn crc32c(bytes: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut table = [0u32; 256];
        for (i, entry) in table.iter_mut().enumerate() {
            let mut crc = i as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
            }
            *entry = crc;
        }
        table
    });
    let mut crc = !0u32;
    for &b in bytes {
        crc = table[((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The masked CRC TensorFlow stores (so that a CRC of data holding CRCs stays well distributed).
pub fn masked_crc32c(bytes: &[u8]) -> u32 {
    let crc = crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One framed record, ready to append to an event file.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// Splits an event file back into its records, checking both CRCs of each. Used by tests and by
/// `frugal` itself to read back what it wrote.
pub fn unframe(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut records = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 12 {
            return Err(format!(
                "truncated record header ({} bytes left)",
                bytes.len()
            ));
        }
        let len_bytes = &bytes[..8];
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        let len_crc = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if len_crc != masked_crc32c(len_bytes) {
            return Err("bad length CRC".into());
        }
        let rest = &bytes[12..];
        if rest.len() < len + 4 {
            return Err(format!(
                "truncated record: {len} bytes announced, {} left",
                rest.len()
            ));
        }
        let data = &rest[..len];
        let data_crc = u32::from_le_bytes(rest[len..len + 4].try_into().expect("4 bytes"));
        if data_crc != masked_crc32c(data) {
            return Err("bad data CRC".into());
        }
        records.push(data.to_vec());
        bytes = &rest[len + 4..];
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn frame_roundtrip() {
        let records = [b"hello".to_vec(), vec![], vec![7u8; 1000]];
        let mut file = Vec::new();
        for r in &records {
            file.extend(frame(r));
        }
        assert_eq!(unframe(&file).unwrap(), records.to_vec());
        let mut corrupt = file.clone();
        corrupt[14] ^= 1;
        assert!(unframe(&corrupt).is_err());
        assert!(unframe(&file[..file.len() - 1]).is_err());
    }
}
