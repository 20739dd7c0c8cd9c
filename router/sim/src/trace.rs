//! The run's trace: one line per step, hashed into a fingerprint of the whole run (two
//! runs of one seed must give the same), the last lines kept for a failure report, and,
//! when asked, every line handed to the caller after each step (`--trace`).

use std::collections::VecDeque;

/// Lines kept for a failure report.
pub const TRACE_TAIL: usize = 40;

#[derive(Debug)]
pub struct Trace {
    hash: u64,
    tail: VecDeque<String>,
    /// Lines not yet taken by the caller, when it wants them.
    new_lines: Option<Vec<String>>,
}

impl Trace {
    pub fn new(hand_over: bool) -> Self {
        Trace {
            // FNV-1a's offset basis.
            hash: 0xCBF2_9CE4_8422_2325,
            tail: VecDeque::with_capacity(TRACE_TAIL),
            new_lines: hand_over.then(Vec::new),
        }
    }

    pub fn record(&mut self, step: u64, line: String) {
        let line = format!("{step:>6} {line}");
        for byte in line.bytes().chain(std::iter::once(b'\n')) {
            self.hash ^= u64::from(byte);
            self.hash = self.hash.wrapping_mul(0x0000_0100_0000_01B3);
        }
        if let Some(lines) = &mut self.new_lines {
            lines.push(line.clone());
        }
        if self.tail.len() == TRACE_TAIL {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    /// FNV-1a over every line so far.
    pub fn hash(&self) -> u64 {
        self.hash
    }

    /// The lines recorded since the last call (none unless asked for at creation).
    pub fn take_new(&mut self) -> Vec<String> {
        self.new_lines
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    pub fn tail(&self) -> Vec<String> {
        self.tail.iter().cloned().collect()
    }
}
