//! Which leasable tasks a lease statement takes: the cut, decided here for
//! both stores, before any row is locked.
//!
//! A store reads the oldest leasable tasks ([`Candidate`]s: their size and
//! state, not their parameters), [`cut`] decides which order takes each,
//! and the store then locks and leases exactly those (PostgreSQL fenced on
//! the state it read; SQLite's single writer reads and writes in one
//! transaction no one else writes in). So a statement never locks a task
//! it will not hand out: tasks past a byte limit stay unlocked for every
//! other statement and instance (locking them first, as a `LIMIT n FOR
//! UPDATE SKIP LOCKED` of all the orders wanted, hid them from everyone
//! until the statement committed).
//!
//! The orders take the candidates in turn, oldest first: each takes a run
//! of them up to its task limit and its byte limit (an answer's first task
//! whatever its size), and the next order starts where it stopped. A task
//! whose lease ran out on its last allowed attempt is ended FAILED rather
//! than leased, and takes no room: it is not in anyone's answer.

use uuid::Uuid;

/// A leasable task as the cut sees it: read without a lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The task.
    pub task_id: Uuid,
    /// The bytes of its parameters (canonical JSON).
    pub size: i64,
    /// Whether it was running (its lease ran out) rather than queued.
    pub running: bool,
    /// Its attempt number as read: the fence of the write that follows.
    pub attempt: i32,
}

impl Candidate {
    /// Whether leasing it would be an attempt past `max_attempts`: its
    /// last allowed lease ran out, so it ends FAILED instead.
    pub fn ends(&self, max_attempts: i32) -> bool {
        self.running && is_last_attempt(self.attempt, max_attempts)
    }

    /// The message the lease's write gives the task: a running task's
    /// lease ran out ([`expired_message`]), whether it is leased again or
    /// ends; `None` keeps a queued task's own message.
    pub fn message(&self, max_attempts: i32) -> Option<String> {
        self.running
            .then(|| expired_message(self.attempt, max_attempts))
    }
}

/// Whether `attempt` is the last a task may make: the attempt limit, one
/// rule for a lease that ran out (the cut) and a failure (`queue::retry`).
pub fn is_last_attempt(attempt: i32, max_attempts: i32) -> bool {
    attempt >= max_attempts
}

/// What one order may still take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    /// Tasks.
    pub tasks: i64,
    /// Bytes of parameters.
    pub bytes: i64,
    /// Whether the answer holds a task already (the first one is taken
    /// whatever its size).
    pub holds_any: bool,
}

impl Room {
    /// The room of an order that holds nothing yet.
    pub fn new(max_tasks: i64, max_bytes: i64) -> Self {
        Self {
            tasks: max_tasks,
            bytes: max_bytes,
            holds_any: false,
        }
    }

    /// Whether a task of `size` bytes fits.
    pub fn fits(&self, size: i64) -> bool {
        self.tasks > 0 && (!self.holds_any || size <= self.bytes)
    }

    /// Takes a task of `size` bytes.
    pub fn take(&mut self, size: i64) {
        self.tasks -= 1;
        self.bytes -= size;
        self.holds_any = true;
    }

    /// Whether no task could fit any more.
    pub fn is_full(&self) -> bool {
        self.tasks <= 0 || (self.holds_any && self.bytes <= 0)
    }
}

/// One candidate's place in the cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    /// Which candidate (its index in the candidates given to [`cut`]).
    pub candidate: usize,
    /// Which order takes it (its index in the rooms given to [`cut`]).
    pub order: usize,
    /// Whether it ends FAILED instead of being leased.
    pub ends: bool,
}

/// What [`cut`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cut {
    /// The candidates taken, in the candidates' order.
    pub picks: Vec<Pick>,
    /// Whether candidates remain that no order had room for: leasable
    /// tasks left behind, unlocked, that waiting pollers should be told of.
    pub left_behind: bool,
}

/// Hands the candidates (oldest first) to the orders in turn, each up to
/// its room; see the module's documentation.
pub fn cut(rooms: &[Room], candidates: &[Candidate], max_attempts: i32) -> Cut {
    let mut rooms = rooms.to_vec();
    let mut order = 0;
    let mut picks = Vec::new();
    for (index, candidate) in candidates.iter().enumerate() {
        while order < rooms.len() && rooms[order].is_full() {
            order += 1;
        }
        if order == rooms.len() {
            return Cut {
                picks,
                left_behind: true,
            };
        }
        if candidate.ends(max_attempts) {
            picks.push(Pick {
                candidate: index,
                order,
                ends: true,
            });
            continue;
        }
        while order < rooms.len() && !rooms[order].fits(candidate.size) {
            order += 1;
        }
        let Some(room) = rooms.get_mut(order) else {
            return Cut {
                picks,
                left_behind: true,
            };
        };
        room.take(candidate.size);
        picks.push(Pick {
            candidate: index,
            order,
            ends: false,
        });
    }
    Cut {
        picks,
        left_behind: false,
    }
}

/// The most rounds (a read and a statement) one batch of orders makes. A
/// round after the first is for orders that still have room: another
/// statement took some of the picks first, or tasks past their last
/// attempt, ended FAILED, filled the read. Each ends or skips what it
/// read, so rounds make progress; past the bound the store wakes the
/// pollers that wait, the batch's own included, to read again.
pub const MAX_ROUNDS: usize = 64;
/// The most rounds of a batch in which another statement took picks first
/// (several instances after the same oldest tasks).
pub const MAX_CONTENDED_ROUNDS: usize = 8;

/// Whether a lease statement should be followed by another round for the
/// orders that still have room (`rooms`, after the statement): some of its
/// picks were taken by another statement first (`skipped`), or the read
/// returned as many candidates as it asked for (`read_full`) and the cut
/// took them all, so that more may wait behind them (tasks ended FAILED
/// took no room). When the cut left candidates behind, no order had room
/// for the next one, and reading again would find it first again.
pub fn another_round(rooms: &[Room], cut: &Cut, skipped: bool, read_full: bool) -> bool {
    (skipped || (read_full && !cut.left_behind)) && rooms.iter().any(|room| !room.is_full())
}

/// What a store does after a lease round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterRound {
    /// The orders are served: answer them.
    Done,
    /// Read and lease again for the orders that still have room.
    Again,
    /// Past the bound on rounds: answer, and wake the pollers that wait
    /// (the batch's own included) to read again, since tasks may still
    /// wait for them.
    GiveUp,
}

/// The rounds of one batch of orders, counted so that both stores stop
/// by the same rule: [`another_round`], bounded by [`MAX_ROUNDS`] and
/// [`MAX_CONTENDED_ROUNDS`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Rounds {
    rounds: usize,
    contended: usize,
}

impl Rounds {
    /// Counts a round that ended with `rooms` after `cut`; `skipped`:
    /// another statement took some of its picks first; `read_full`: the
    /// read returned as many candidates as it asked for.
    pub fn after(
        &mut self,
        rooms: &[Room],
        cut: &Cut,
        skipped: bool,
        read_full: bool,
    ) -> AfterRound {
        self.rounds += 1;
        if !another_round(rooms, cut, skipped, read_full) {
            return AfterRound::Done;
        }
        self.contended += usize::from(skipped);
        if self.rounds >= MAX_ROUNDS || self.contended >= MAX_CONTENDED_ROUNDS {
            AfterRound::GiveUp
        } else {
            AfterRound::Again
        }
    }
}

/// How many candidates to read for `rooms`: enough to fill every order
/// that has room by count (a byte limit only ever takes fewer).
pub fn candidates_wanted(rooms: &[Room]) -> i64 {
    rooms
        .iter()
        .filter(|room| !room.is_full())
        .map(|room| room.tasks.max(0))
        .sum()
}

/// The message kept on a task whose lease ran out on `attempt` of
/// `max_attempts`, whether it is leased again or ends FAILED.
pub fn expired_message(attempt: i32, max_attempts: i32) -> String {
    format!(
        "the lease of attempt {attempt} of {max_attempts} expired before its worker completed or failed the task"
    )
}

#[cfg(test)]
mod tests;
