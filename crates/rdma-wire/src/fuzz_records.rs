//! The record framing of Ferry's fuzz inputs (`fuzz/` at the top of the repository): a byte
//! string is a sequence of `[control: u8][length: u16 LE][bytes]`; a length past the end takes
//! what is left. Not an API.

/// Iterates over the records `(control, bytes)` of a fuzz input.
#[derive(Clone, Debug)]
pub struct Records<'a>(pub &'a [u8]);

impl<'a> Iterator for Records<'a> {
    type Item = (u8, &'a [u8]);

    fn next(&mut self) -> Option<(u8, &'a [u8])> {
        let (&ctl, rest) = self.0.split_first()?;
        let (len, rest) = match rest.split_first_chunk::<2>() {
            Some((l, r)) => (u16::from_le_bytes(*l) as usize, r),
            None => (rest.len(), rest),
        };
        let (bytes, tail) = rest.split_at(len.min(rest.len()));
        self.0 = tail;
        Some((ctl, bytes))
    }
}
