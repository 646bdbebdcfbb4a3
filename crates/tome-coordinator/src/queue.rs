//! Admission: the jobs running now and the bounded, fair queue of requests waiting to run.
//!
//! A request takes a [`Ticket`] when it arrives: it is refused (RESOURCE_EXHAUSTED for now,
//! with `retry-after`) only when more requests already wait than `max_waiting` beyond the free
//! running places. Once tokenized it waits for a running place ([`Ticket::wait_to_run`]) within
//! three bounds: jobs in flight, tokens in flight, and jobs per caller. Waiting tokens are
//! bounded too (`max_waiting_tokens`), since a waiting request holds its tokenized document.
//!
//! Places go to callers in turn: the next request to run is the oldest of the caller with the
//! fewest jobs running now, among callers under their own limit. A request that does not fit the
//! tokens in flight is never overtaken by a smaller one behind it, so a long document cannot
//! wait forever behind a stream of short ones.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::oneshot;
use tome_server::auth::Caller;

use crate::error::CoordError;
use crate::metrics;

/// How many requests may run and wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLimits {
    /// Jobs running at once.
    pub max_jobs: usize,
    /// Tokens of the running jobs together.
    pub max_tokens: usize,
    /// Jobs one caller may run at once (0: no limit of its own).
    pub max_jobs_per_caller: usize,
    /// Requests waiting beyond the free running places (0: refuse what cannot run now).
    pub max_waiting: usize,
    /// Tokens of the tokenized requests waiting together.
    pub max_waiting_tokens: usize,
}

/// The admission state, shared by every request's [`Ticket`] and [`Running`] place.
#[derive(Clone)]
pub(crate) struct JobQueue {
    shared: Arc<Shared>,
}

struct Shared {
    limits: QueueLimits,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Shutting down: nothing more is let in or kept waiting.
    closed: bool,
    running: usize,
    running_tokens: usize,
    running_by_caller: HashMap<Arc<str>, usize>,
    /// Requests that arrived and do not run yet (tokenizing or waiting).
    pending: usize,
    /// Tokenized requests waiting for a place, oldest first.
    waiting: Vec<Waiter>,
    waiting_tokens: usize,
    next_ticket: u64,
}

struct Waiter {
    ticket: u64,
    caller: Arc<str>,
    tokens: usize,
    grant: oneshot::Sender<Running>,
}

/// A request's place in the queue from its arrival until it runs; dropped, it leaves the queue.
pub(crate) struct Ticket {
    queue: JobQueue,
    id: u64,
    caller: Arc<str>,
    arrived: Instant,
    /// Whether it is in `State::waiting` (or was granted from there).
    enqueued: bool,
    /// Whether it became a running job.
    ran: bool,
}

/// A running job's place; given back (and the next request let in) when dropped.
pub(crate) struct Running {
    queue: JobQueue,
    caller: Arc<str>,
    tokens: usize,
}

impl JobQueue {
    pub(crate) fn new(limits: QueueLimits) -> Self {
        let queue = JobQueue { shared: Arc::new(Shared { limits, state: Mutex::default() }) };
        queue.lock().publish();
        queue
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Jobs running now.
    pub(crate) fn running(&self) -> usize {
        self.lock().running
    }

    /// A place in the queue for a request of `caller`, or RESOURCE_EXHAUSTED (for now) when the
    /// queue is full.
    pub(crate) fn arrive(&self, caller: &Caller) -> Result<Ticket, CoordError> {
        let limits = self.shared.limits;
        let mut state = self.lock();
        if state.closed {
            return Err(shutting_down());
        }
        let free = limits.max_jobs.saturating_sub(state.running);
        if state.pending >= free + limits.max_waiting {
            return Err(CoordError::Busy(format!(
                "the server is busy: {} jobs run and {} requests wait, the most its queue holds (--max-queued-requests); retry later",
                state.running, state.pending
            )));
        }
        state.pending += 1;
        state.next_ticket += 1;
        let id = state.next_ticket;
        state.publish();
        Ok(Ticket { queue: self.clone(), id, caller: caller.0.clone(), arrived: Instant::now(), enqueued: false, ran: false })
    }

    /// Shuts the queue: requests waiting now, and any that arrive later, are refused
    /// (UNAVAILABLE); running jobs keep their places.
    pub(crate) fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        let left = std::mem::take(&mut state.waiting);
        state.pending -= left.len();
        state.waiting_tokens = 0;
        state.publish();
        // Dropping a waiter's sender tells it (`Ticket::wait_to_run`).
        drop(left);
    }

    /// Gives places to waiting requests while some fit, callers in turn (see the module doc).
    /// Returns the places whose requests left before they could take them: the caller drops
    /// them after unlocking, which lets the next ones in.
    fn dispatch(&self, state: &mut State) -> Vec<Running> {
        let limits = self.shared.limits;
        let mut unclaimed = Vec::new();
        loop {
            let running_of = |caller: &Arc<str>| state.running_by_caller.get(caller).copied().unwrap_or(0);
            let next = state
                .waiting
                .iter()
                .enumerate()
                .filter(|(_, w)| limits.max_jobs_per_caller == 0 || running_of(&w.caller) < limits.max_jobs_per_caller)
                .min_by_key(|(_, w)| (running_of(&w.caller), w.ticket))
                .map(|(i, _)| i);
            let Some(i) = next else { break };
            let w = &state.waiting[i];
            if state.running >= limits.max_jobs || state.running_tokens + w.tokens > limits.max_tokens {
                break;
            }
            let w = state.waiting.remove(i);
            state.waiting_tokens -= w.tokens;
            state.pending -= 1;
            state.running += 1;
            state.running_tokens += w.tokens;
            *state.running_by_caller.entry(w.caller.clone()).or_default() += 1;
            let place = Running { queue: self.clone(), caller: w.caller, tokens: w.tokens };
            if let Err(place) = w.grant.send(place) {
                unclaimed.push(place);
            }
        }
        state.publish();
        unclaimed
    }
}

impl State {
    fn publish(&self) {
        metrics::queue_now(self.pending, self.waiting_tokens);
    }
}

impl Ticket {
    /// Waits for a running place for this request's `tokens`, until `deadline`
    /// (DEADLINE_EXCEEDED after it). RESOURCE_EXHAUSTED: for good when the document has more
    /// tokens than run at once here, for now when the waiting tokens would exceed their bound.
    pub(crate) async fn wait_to_run(mut self, tokens: usize, deadline: Option<Instant>) -> Result<Running, CoordError> {
        let limits = self.queue.shared.limits;
        if tokens > limits.max_tokens {
            return Err(CoordError::Exhausted(format!("the document has {tokens} tokens, more than the {} this server runs at once (--max-tokens-in-flight)", limits.max_tokens)));
        }
        let (grant, granted) = oneshot::channel();
        let unclaimed = {
            let mut state = self.queue.lock();
            if state.closed {
                return Err(shutting_down());
            }
            if !state.waiting.is_empty() && state.waiting_tokens + tokens > limits.max_waiting_tokens {
                return Err(CoordError::Busy(format!(
                    "the server is busy: {} tokens already wait, and {tokens} more would exceed the {} its queue holds (--max-queued-tokens); retry later",
                    state.waiting_tokens, limits.max_waiting_tokens
                )));
            }
            state.waiting.push(Waiter { ticket: self.id, caller: self.caller.clone(), tokens, grant });
            state.waiting_tokens += tokens;
            self.enqueued = true;
            self.queue.dispatch(&mut state)
        };
        drop(unclaimed);
        // The sender goes without a place only when the queue closes.
        let place = until(deadline, granted).await?.map_err(|_| shutting_down())?;
        self.ran = true;
        metrics::queue_wait(self.arrived.elapsed());
        Ok(place)
    }
}

fn shutting_down() -> CoordError {
    CoordError::Unavailable("the server is shutting down; retry elsewhere".into())
}

/// `wait`'s output, or DEADLINE_EXCEEDED once `deadline` has passed.
pub(crate) async fn until<F: std::future::Future>(deadline: Option<Instant>, wait: F) -> Result<F::Output, CoordError> {
    match deadline {
        None => Ok(wait.await),
        Some(d) => tokio::time::timeout_at(tokio::time::Instant::from_std(d), wait).await.map_err(|_| CoordError::DeadlineExceeded),
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.ran {
            return;
        }
        let unclaimed = {
            let mut state = self.queue.lock();
            if let Some(i) = state.waiting.iter().position(|w| w.ticket == self.id) {
                let w = state.waiting.remove(i);
                state.waiting_tokens -= w.tokens;
                state.pending -= 1;
            } else if !self.enqueued {
                state.pending -= 1;
            }
            // Fewer waiting tokens may let a request in; a granted place not taken comes back
            // through `Running::drop`.
            self.queue.dispatch(&mut state)
        };
        drop(unclaimed);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let unclaimed = {
            let mut state = self.queue.lock();
            state.running -= 1;
            state.running_tokens -= self.tokens;
            if let Some(n) = state.running_by_caller.get_mut(&self.caller) {
                *n -= 1;
                if *n == 0 {
                    state.running_by_caller.remove(&self.caller);
                }
            }
            self.queue.dispatch(&mut state)
        };
        drop(unclaimed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits(max_jobs: usize, max_waiting: usize) -> QueueLimits {
        QueueLimits { max_jobs, max_tokens: 1_000, max_jobs_per_caller: 0, max_waiting, max_waiting_tokens: 1_000 }
    }

    fn caller(name: &str) -> Caller {
        Caller(name.into())
    }

    /// Starts waiting for a place in a task of its own; the handle yields the place.
    fn wait(queue: &JobQueue, who: &str, tokens: usize) -> tokio::task::JoinHandle<Result<Running, CoordError>> {
        let ticket = queue.arrive(&caller(who)).unwrap();
        tokio::spawn(ticket.wait_to_run(tokens, None))
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn requests_beyond_the_running_jobs_wait_and_run_in_turn() {
        let queue = JobQueue::new(limits(1, 2));
        let first = queue.arrive(&caller("a")).unwrap().wait_to_run(10, None).await.unwrap();
        let second = wait(&queue, "a", 10);
        let third = wait(&queue, "a", 10);
        settle().await;
        assert!(!second.is_finished() && !third.is_finished(), "both wait while one job runs");
        let refused = tonic::Status::from(queue.arrive(&caller("a")).err().expect("a full queue refuses"));
        assert!(tome_server::status::is_busy(&refused), "refused for now, with retry-after: {refused:?}");
        assert!(refused.message().contains("--max-queued-requests"), "{refused:?}");
        drop(first);
        let second = second.await.unwrap().unwrap();
        settle().await;
        assert!(!third.is_finished(), "one job at a time");
        drop(second);
        drop(third.await.unwrap().unwrap());
        assert_eq!(queue.running(), 0);
        let state = queue.lock();
        assert_eq!((state.pending, state.waiting.len(), state.waiting_tokens), (0, 0, 0), "nothing is left behind");
    }

    #[tokio::test]
    async fn callers_take_turns_whoever_queued_first() {
        let queue = JobQueue::new(limits(1, 10));
        let running = queue.arrive(&caller("a")).unwrap().wait_to_run(1, None).await.unwrap();
        // Caller a queues three requests before b queues one; b's runs second all the same.
        let a: Vec<_> = (0..3).map(|_| wait(&queue, "a", 1)).collect();
        settle().await;
        let b = wait(&queue, "b", 1);
        settle().await;
        drop(running);
        let first = a.into_iter().next().unwrap();
        // The oldest request of a caller with no job running: a's first (a runs none now either).
        let place = first.await.unwrap().unwrap();
        settle().await;
        assert!(!b.is_finished());
        drop(place);
        let b_place = b.await.unwrap().unwrap();
        assert_eq!(&*b_place.caller, "b", "b ran before a's second and third");
    }

    #[tokio::test]
    async fn a_caller_at_its_limit_waits_while_others_run() {
        let queue = JobQueue::new(QueueLimits { max_jobs_per_caller: 1, ..limits(3, 10) });
        let _a1 = queue.arrive(&caller("a")).unwrap().wait_to_run(1, None).await.unwrap();
        let a2 = wait(&queue, "a", 1);
        let b1 = wait(&queue, "b", 1);
        let b1 = b1.await.unwrap().unwrap();
        settle().await;
        assert!(!a2.is_finished(), "a runs one job at most");
        drop(_a1);
        drop(a2.await.unwrap().unwrap());
        drop(b1);
    }

    #[tokio::test]
    async fn a_long_document_is_not_overtaken_and_token_bounds_hold() {
        let queue = JobQueue::new(QueueLimits { max_tokens: 100, max_waiting_tokens: 150, ..limits(4, 10) });
        let small = queue.arrive(&caller("a")).unwrap().wait_to_run(60, None).await.unwrap();
        let long = wait(&queue, "b", 100);
        settle().await;
        let short = wait(&queue, "c", 10);
        settle().await;
        assert!(!long.is_finished() && !short.is_finished(), "the short one does not pass the long one");
        let over = queue.arrive(&caller("d")).unwrap().wait_to_run(50, None).await.err().expect("waiting tokens bounded");
        assert!(tome_server::status::is_busy(&over.into()), "for now");
        let too_large = queue.arrive(&caller("d")).unwrap().wait_to_run(101, None).await.err().expect("more than run at once");
        let too_large = tonic::Status::from(too_large);
        assert!(!tome_server::status::is_busy(&too_large) && too_large.code() == tonic::Code::ResourceExhausted, "for good: {too_large:?}");
        drop(small);
        let long = long.await.unwrap().unwrap();
        settle().await;
        assert!(!short.is_finished());
        drop(long);
        drop(short.await.unwrap().unwrap());
    }

    #[tokio::test]
    async fn a_request_that_leaves_or_times_out_gives_its_place_back() {
        let queue = JobQueue::new(limits(1, 2));
        let running = queue.arrive(&caller("a")).unwrap().wait_to_run(1, None).await.unwrap();
        let late = queue.arrive(&caller("b")).unwrap().wait_to_run(1, Some(Instant::now() + Duration::from_millis(20))).await;
        assert!(matches!(late, Err(CoordError::DeadlineExceeded)), "waited past its deadline");
        let gone = wait(&queue, "c", 1);
        settle().await;
        gone.abort();
        let _ = gone.await;
        let next = wait(&queue, "d", 1);
        settle().await;
        drop(running);
        drop(next.await.unwrap().unwrap());
        // A ticket dropped before it queued (its tokenization failed) leaves no trace either.
        drop(queue.arrive(&caller("e")).unwrap());
        let state = queue.lock();
        assert_eq!((state.running, state.pending, state.waiting.len()), (0, 0, 0));
    }

    #[tokio::test]
    async fn a_closed_queue_sends_its_waiting_requests_elsewhere_and_lets_running_jobs_finish() {
        let queue = JobQueue::new(limits(1, 4));
        let running = queue.arrive(&caller("a")).unwrap().wait_to_run(1, None).await.unwrap();
        let waiting = wait(&queue, "b", 1);
        let tokenizing = queue.arrive(&caller("c")).unwrap();
        settle().await;
        queue.close();
        let refused = tonic::Status::from(waiting.await.unwrap().err().expect("a waiting request is refused"));
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        assert!(matches!(tokenizing.wait_to_run(1, None).await, Err(CoordError::Unavailable(_))), "one still tokenizing too");
        assert!(matches!(queue.arrive(&caller("d")).err(), Some(CoordError::Unavailable(_))), "and any that arrives");
        assert_eq!(queue.running(), 1, "the running job keeps its place");
        drop(running);
        let state = queue.lock();
        assert_eq!((state.running, state.pending, state.waiting.len(), state.waiting_tokens), (0, 0, 0, 0));
    }

    #[tokio::test]
    async fn with_no_queue_what_cannot_run_now_is_refused() {
        let queue = JobQueue::new(limits(1, 0));
        let ticket = queue.arrive(&caller("a")).unwrap();
        assert!(queue.arrive(&caller("b")).is_err(), "the one free place is taken by a request tokenizing");
        let running = ticket.wait_to_run(1, None).await.unwrap();
        assert!(queue.arrive(&caller("b")).is_err());
        drop(running);
        assert!(queue.arrive(&caller("b")).is_ok());
    }
}
