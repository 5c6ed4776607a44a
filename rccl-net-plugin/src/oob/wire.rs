//! Little-endian field reading for the bootstrap's wire formats.

use super::HandleError;

/// Reads fields front to back; running past the end is a `Malformed` error, never a panic.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(super) fn bytes<const N: usize>(&mut self) -> Result<[u8; N], HandleError> {
        let end = self.pos.checked_add(N).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(HandleError::Malformed(format!(
                "truncated: {} bytes, the field at offset {} needs {N} more",
                self.buf.len(),
                self.pos
            )));
        };
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[self.pos..end]);
        self.pos = end;
        Ok(out)
    }

    pub(super) fn u8(&mut self) -> Result<u8, HandleError> {
        Ok(self.bytes::<1>()?[0])
    }

    pub(super) fn u16(&mut self) -> Result<u16, HandleError> {
        self.bytes().map(u16::from_le_bytes)
    }

    pub(super) fn u32(&mut self) -> Result<u32, HandleError> {
        self.bytes().map(u32::from_le_bytes)
    }

    pub(super) fn u64(&mut self) -> Result<u64, HandleError> {
        self.bytes().map(u64::from_le_bytes)
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}
