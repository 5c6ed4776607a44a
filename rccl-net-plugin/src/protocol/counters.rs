//! What one end of a connection did, counted by the protocol core as it happens: plain `u64`s
//! bumped on the data path (no atomics, no allocation), read when the comm closes.

/// Protocol events of one send or receive comm. Each end fills in the fields that apply to it;
/// the others stay 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Requests that completed successfully (reported done by `test`).
    pub msgs: u64,
    /// Payload bytes of those requests (sent, or received as reported to the caller).
    pub bytes: u64,
    /// Work requests handed to the verbs layer (data, sizes, eager and clear-to-send writes).
    pub wrs: u64,
    /// Successful completions polled, by kind: a row's transmit, an eager write, landed data
    /// of a row spread over several queue pairs (sender); a clear-to-send write, an incoming
    /// immediate (receiver).
    pub cqe_transmit: u64,
    pub cqe_eager: u64,
    pub cqe_landed: u64,
    pub cqe_cts: u64,
    pub cqe_imm: u64,
    /// Sender: sends that found no clear-to-send row for them yet (the receiver had not posted
    /// the receive; the send went eagerly or the caller got a NULL request).
    pub cts_waits: u64,
    /// Sender: sends that went eagerly; those whose receive showed in the row they were sent
    /// ahead of, and those a later row took (the first had no entry for their tag).
    pub eager_sent: u64,
    pub eager_accepted: u64,
    pub eager_carried: u64,
    /// Receiver: eager messages delivered into a posted receive (by the CPU, or by the NIC into
    /// GPU memory), those of them the NIC copied, and those too large for their buffer (the
    /// receive failed).
    pub eager_taken: u64,
    pub eager_dma: u64,
    pub eager_dropped: u64,
}

impl Counters {
    /// Completions polled, all kinds together.
    pub fn cqes(&self) -> u64 {
        self.cqe_transmit + self.cqe_eager + self.cqe_landed + self.cqe_cts + self.cqe_imm
    }
}
