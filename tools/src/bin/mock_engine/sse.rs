//! Server-sent-events streaming body for chat and text completions.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Frame;
use tokio::time::{Instant, Sleep};

use crate::guard::InflightGuard;
use crate::wire::{now_us, sse_event, ChoiceChunk, Chunk, Delta, Kind, Usage, DONE_EVENT};

const DROP_GRACE: Duration = Duration::from_millis(5);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Role,
    Tokens,
    Usage,
    Done,
    Finished,
}

pub struct StreamParams {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u32,
    pub include_usage: bool,
    pub drop_after: Option<u32>,
    pub interval: Duration,
}

pub struct SseStream {
    p: StreamParams,
    sent: u32,
    phase: Phase,
    /// Timer for the gap before the next content chunk (reused).
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
    drop_grace_done: bool,
    /// Deadline of the next content chunk; deadlines advance by exactly
    /// `interval`, so timer overshoot does not accumulate.
    next_at: Option<Instant>,
    guard: InflightGuard,
}

impl SseStream {
    pub fn new(p: StreamParams, mut guard: InflightGuard) -> Self {
        guard.set_streaming();
        let phase = match p.kind {
            Kind::Chat => Phase::Role,
            Kind::Completion => Phase::Tokens,
        };
        SseStream {
            p,
            sent: 0,
            phase,
            sleep: None,
            armed: false,
            drop_grace_done: false,
            next_at: None,
            guard,
        }
    }

    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
    }

    fn chunk(&self, choices: &[ChoiceChunk<'_>], usage: Option<Usage>) -> Bytes {
        let object = match self.p.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        sse_event(&Chunk {
            id: &self.p.id,
            object,
            created: self.p.created,
            model: &self.p.model,
            choices,
            usage,
            mock_sent_us: now_us(),
        })
    }

    fn token_chunk(&self, n: u32) -> Bytes {
        let text = format!("tok{n} ");
        let finish = if n + 1 >= self.p.completion_tokens {
            Some("length")
        } else {
            None
        };
        let choice = match self.p.kind {
            Kind::Chat => ChoiceChunk::Chat {
                index: 0,
                delta: Delta {
                    role: None,
                    content: &text,
                },
                logprobs: None,
                finish_reason: finish,
            },
            Kind::Completion => ChoiceChunk::Completion {
                index: 0,
                text: &text,
                logprobs: None,
                finish_reason: finish,
            },
        };
        self.chunk(&[choice], None)
    }

    /// Schedule the next content chunk `interval` after the previous one.
    fn arm_next_token(&mut self) {
        let deadline = self.next_at.unwrap_or_else(Instant::now) + self.p.interval;
        self.next_at = Some(deadline);
        self.arm_timer(deadline);
    }

    fn arm_timer(&mut self, deadline: Instant) {
        match self.sleep.as_mut() {
            Some(s) => s.as_mut().reset(deadline),
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        self.armed = true;
    }

    pub fn poll_next_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        loop {
            if self.armed {
                if let Some(sleep) = self.sleep.as_mut() {
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
                self.armed = false;
            }
            match self.phase {
                Phase::Role => {
                    self.phase = Phase::Tokens;
                    let choice = ChoiceChunk::Chat {
                        index: 0,
                        delta: Delta {
                            role: Some("assistant"),
                            content: "",
                        },
                        logprobs: None,
                        finish_reason: None,
                    };
                    let data = self.chunk(&[choice], None);
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Phase::Tokens => {
                    if self.p.drop_after == Some(self.sent) {
                        if !self.drop_grace_done {
                            // Pause briefly so hyper flushes the chunks already
                            // produced before the connection is aborted.
                            self.drop_grace_done = true;
                            self.arm_timer(Instant::now() + DROP_GRACE);
                            continue;
                        }
                        self.phase = Phase::Finished;
                        self.guard.dropped_by_server();
                        log::debug!("dropping stream after {} chunks", self.sent);
                        return Poll::Ready(Some(Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "mock: --drop-after-chunks",
                        ))));
                    }
                    if self.sent >= self.p.completion_tokens {
                        self.phase = Phase::Usage;
                        continue;
                    }
                    let data = self.token_chunk(self.sent);
                    self.sent += 1;
                    if self.sent < self.p.completion_tokens && !self.p.interval.is_zero() {
                        self.arm_next_token();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Phase::Usage => {
                    self.phase = Phase::Done;
                    if self.p.include_usage {
                        let usage =
                            Usage::new(self.p.prompt_tokens, u64::from(self.p.completion_tokens));
                        let data = self.chunk(&[], Some(usage));
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Phase::Done => {
                    self.phase = Phase::Finished;
                    self.guard.finish_in_place();
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(DONE_EVENT)))));
                }
                Phase::Finished => return Poll::Ready(None),
            }
        }
    }
}
