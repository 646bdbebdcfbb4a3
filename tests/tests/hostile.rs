//! The hostile-input and fault suite: malformed, oversized, unauthenticated and cross-job
//! requests against the public service (`tome.v1.Tome`) and the internal ones (`tome.v1.Worker`,
//! `tome.v1.Peer`), then faults (a worker killed mid-job, a peer that goes silent, etcd killed).
//!
//! Every case is a row of a table: the service, the request, and the gRPC code it must get (its
//! message too, where it matters). Every answer must also be short and free of the server's
//! internals. The suite counts crashes (a server process that exited), panics (`panicked` in a
//! server's log), hangs (no answer within [`HANG_AFTER`]) and wrong codes or messages, prints the
//! table, and asserts that all four counts are zero; after the hostile cases the same job gives
//! the same output as before them.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant};

use prost::bytes::{Buf, BufMut};
use tome_e2e::*;
use tome_proto::v1 as pb;
use tome_proto::v1::peer_client::PeerClient;
use tome_proto::v1::tome_client::TomeClient;
use tome_proto::v1::worker_client::WorkerClient;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// A call that has not answered within this long hangs.
const HANG_AFTER: Duration = Duration::from_secs(20);
/// A job hit by a fault (a worker killed or stopped) that has not ended within this long hangs:
/// finding a silent peer takes two keepalive periods (20 s), then the job runs again.
const FAULT_LIMIT: Duration = Duration::from_secs(120);
/// The longest status message a hostile request may get back.
const MAX_MESSAGE: usize = 512;
/// How long a peer stream waits for its open frame and its rank, on every worker here.
const RENDEZVOUS_SECONDS: &str = "3";
/// The largest message the directly attacked worker takes.
const TARGET_MAX_MESSAGE: usize = 4 << 20;
/// The largest document the coordinator takes, in bytes.
const MAX_DOCUMENT_BYTES: usize = 400_000;
/// The largest message the coordinator takes.
const COORDINATOR_MAX_MESSAGE: usize = 2 << 20;
/// MiniLM's layers.
const LAYERS: usize = 6;

fn logs(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tome-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}.log"))
}

type Call = Pin<Box<dyn Future<Output = Result<(), Status>> + Send>>;

/// One row of the table: a request and what it must get.
struct Case {
    service: &'static str,
    name: String,
    want: Vec<Code>,
    /// A substring the status message must contain.
    contains: Option<&'static str>,
    /// How long the answer may take (a hang otherwise).
    within: Duration,
    call: Call,
}

fn case(service: &'static str, name: impl Into<String>, want: &[Code], call: impl Future<Output = Result<(), Status>> + Send + 'static) -> Case {
    Case { service, name: name.into(), want: want.to_vec(), contains: None, within: HANG_AFTER, call: Box::pin(call) }
}

impl Case {
    fn saying(mut self, part: &'static str) -> Case {
        self.contains = Some(part);
        self
    }

    fn within(mut self, limit: Duration) -> Case {
        self.within = limit;
        self
    }
}

/// What a case got.
struct Row {
    service: &'static str,
    name: String,
    want: Vec<Code>,
    /// None: no answer in time.
    got: Option<Code>,
    seconds: f64,
    /// Why the answer is wrong, if it is.
    fault: Option<String>,
}

/// The suite's counts and every row so far.
#[derive(Default)]
struct Board {
    rows: Vec<Row>,
    crashes: Vec<String>,
    panics: Vec<String>,
}

impl Board {
    fn hangs(&self) -> usize {
        self.rows.iter().filter(|r| r.got.is_none()).count()
    }

    fn wrong(&self) -> usize {
        self.rows.iter().filter(|r| r.got.is_some() && r.fault.is_some()).count()
    }

    /// Runs `cases` at once and records what each got.
    async fn run(&mut self, cases: Vec<Case>) {
        let mut running = Vec::new();
        for c in cases {
            let (call, within) = (c.call, c.within);
            let handle = tokio::spawn(async move {
                let started = Instant::now();
                let got = tokio::time::timeout(within, call).await;
                (got, started.elapsed().as_secs_f64())
            });
            running.push((c.service, c.name, c.want, c.contains, handle));
        }
        for (service, name, want, contains, handle) in running {
            let (got, seconds) = handle.await.unwrap();
            let (got, fault) = match got {
                Err(_) => (None, Some("no answer".to_string())),
                Ok(Ok(())) => (Some(Code::Ok), (!want.contains(&Code::Ok)).then(|| "served".to_string())),
                Ok(Err(s)) => (Some(s.code()), judge(&s, &want, contains)),
            };
            self.rows.push(Row { service, name, want, got, seconds, fault });
        }
    }

    /// Runs `cases` one after another: a coordinator admits a few jobs at once and a worker a
    /// few shards, and they refuse more as busy before the checks under test.
    async fn run_in_turn(&mut self, cases: Vec<Case>) {
        for c in cases {
            self.run(vec![c]).await;
        }
    }

    /// Records a check that is not a single call (a job's outcome, an aggregate).
    fn record(&mut self, service: &'static str, name: impl Into<String>, want: Code, got: Result<(), Status>, seconds: f64) {
        let (got, fault) = match got {
            Ok(()) => (Code::Ok, (want != Code::Ok).then(|| "served".to_string())),
            Err(s) => (s.code(), judge(&s, &[want], None)),
        };
        self.rows.push(Row { service, name: name.into(), want: vec![want], got: Some(got), seconds, fault });
    }

    /// As [`Board::record`], for a check that gave no answer within its limit: a hang.
    fn record_hang(&mut self, service: &'static str, name: impl Into<String>, want: Code, seconds: f64) {
        self.rows.push(Row { service, name: name.into(), want: vec![want], got: None, seconds, fault: Some("no answer".into()) });
    }

    /// Records a job's outcome, `None` when it did not end within its limit.
    fn record_job(&mut self, name: &str, got: Option<Result<(), Status>>, seconds: f64) {
        match got {
            Some(got) => self.record("Tome", name, Code::Ok, got, seconds),
            None => self.record_hang("Tome", name, Code::Ok, seconds),
        }
    }

    /// Every server must still run, and none may have panicked.
    fn check_servers(&mut self, servers: &mut [(&str, &mut Server)]) {
        for (name, server) in servers.iter_mut() {
            if let Ok(Some(status)) = server.child.try_wait() {
                self.crashes.push(format!("{name} exited: {status}"));
            }
            self.check_log(name, server);
        }
    }

    fn check_log(&mut self, name: &str, server: &Server) {
        let log = server.log_text();
        if let Some(line) = log.lines().find(|l| l.contains("panicked")) {
            self.panics.push(format!("{name}: {line}"));
        }
    }

    fn print(&self) {
        println!("{:<7} {:<74} {:<36} {:<20} {:>6}  verdict", "service", "case", "expected", "got", "secs");
        for r in &self.rows {
            let want = r.want.iter().map(|c| format!("{c:?}")).collect::<Vec<_>>().join(" or ");
            let got = r.got.map(|c| format!("{c:?}")).unwrap_or_else(|| "HANG".into());
            println!("{:<7} {:<74} {:<36} {:<20} {:>6.1}  {}", r.service, r.name, want, got, r.seconds, r.fault.as_deref().unwrap_or("ok"));
        }
        println!("{} cases: {} crashes, {} panics, {} hangs, {} wrong codes or messages", self.rows.len(), self.crashes.len(), self.panics.len(), self.hangs(), self.wrong());
        for c in &self.crashes {
            println!("crash: {c}");
        }
        for p in &self.panics {
            println!("panic: {p}");
        }
    }
}

/// Why an error status is the wrong answer, if it is: its code, or a message that is long,
/// shows the server's internals, or lacks what it must say.
fn judge(s: &Status, want: &[Code], contains: Option<&str>) -> Option<String> {
    let msg = s.message();
    if !want.contains(&s.code()) {
        return Some(format!("wrong code: {}", msg.chars().take(160).collect::<String>()));
    }
    if msg.len() > MAX_MESSAGE {
        return Some(format!("message of {} bytes", msg.len()));
    }
    let lower = msg.to_lowercase();
    if ["/src/", ".rs:", "panicked", "backtrace", "stack backtrace"].iter().any(|p| lower.contains(p)) {
        return Some(format!("message shows internals: {msg}"));
    }
    if let Some(part) = contains.filter(|p| !msg.contains(p)) {
        return Some(format!("message lacks `{part}`: {msg}"));
    }
    None
}

// --- Raw bytes on the wire, for requests that are not protobuf ---

#[derive(Clone, Copy)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// Sends `body` as the one request message of `path` and reads the answer to its end.
async fn raw_call(addr: String, path: &'static str, body: Vec<u8>) -> Result<(), Status> {
    let channel = Channel::from_shared(addr).unwrap().connect().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let mut answers = grpc.server_streaming(tonic::Request::new(body), PathAndQuery::from_static(path), RawCodec).await?.into_inner();
    while answers.message().await?.is_some() {}
    Ok(())
}

/// Not protobuf: field 1, length-delimited, with a length varint that never ends. tonic answers
/// INTERNAL before any tome code runs, the code gRPC's status codes give a request that cannot
/// be parsed.
const UNDECODABLE: &[u8] = &[0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];

// --- Requests ---

async fn drain<T>(mut stream: tonic::Streaming<T>) -> Result<(), Status> {
    while stream.message().await?.is_some() {}
    Ok(())
}

async fn tome(addr: &str) -> TomeClient<Channel> {
    TomeClient::connect(addr.to_string()).await.unwrap().max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20)
}

async fn worker(addr: &str) -> WorkerClient<Channel> {
    WorkerClient::connect(addr.to_string()).await.unwrap().max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20)
}

async fn peer(addr: &str) -> PeerClient<Channel> {
    PeerClient::connect(addr.to_string()).await.unwrap().max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20)
}

fn process_case(addr: &str, name: &str, want: &[Code], req: pb::ProcessRequest) -> Case {
    let addr = addr.to_string();
    case("Tome", name, want, async move { drain(tome(&addr).await.process(req).await?.into_inner()).await })
}

fn opts(f: impl FnOnce(&mut pb::ProcessOptions)) -> pb::ProcessOptions {
    let mut o = pb::ProcessOptions::default();
    f(&mut o);
    o
}

fn text(t: &str, o: pb::ProcessOptions) -> pb::ProcessRequest {
    text_request(t.as_bytes(), o)
}

fn span(start: u64, end: u64) -> pb::Span {
    pb::Span { start, end }
}

fn u32_tensor(values: &[u32]) -> pb::Tensor {
    pb::Tensor { shape: vec![values.len() as u64], dtype: pb::ElementType::U32 as i32, data: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
}

/// A job's credential as the coordinator would draw it (here, any 32 bytes).
fn secret(byte: u8) -> Vec<u8> {
    vec![byte; 32]
}

/// A sound one-rank shard of 8 tokens on `addr` for job `job`: every Worker case changes one
/// thing of it.
fn shard(addr: &str, job: &str) -> pb::ShardRequest {
    let ids = [101, 2009, 2001, 1996, 2190, 1997, 2335, 102];
    let dense = pb::AttentionOverride { kind: pb::AttentionKind::Dense as i32, ..Default::default() };
    pb::ShardRequest {
        plan: Some(pb::JobPlan {
            job_id: job.into(),
            tokens: 8,
            shards: vec![pb::RankRanges { ranges: vec![span(0, 8)] }],
            rank_addresses: vec![addr.into()],
            traceparent: String::new(),
            transport: pb::Transport::PeerStreams as i32,
            secret: secret(7),
        }),
        rank: 0,
        model: String::new(),
        token_ids: Some(u32_tensor(&ids)),
        position_ids: Some(u32_tensor(&(0..8).collect::<Vec<_>>())),
        layers: vec![dense; LAYERS],
        pooling: pb::Pooling::Mean as i32,
        pool_spans: vec![span(0, 8)],
        ..Default::default()
    }
}

fn run_shard_case(addr: &str, name: &str, want: &[Code], req: pb::ShardRequest) -> Case {
    let url = format!("http://{addr}");
    case("Worker", name, want, async move { drain(worker(&url).await.run_shard(req).await?.into_inner()).await })
}

fn cancel_case(addr: &str, name: &str, want: &[Code], req: pb::CancelRequest) -> Case {
    let url = format!("http://{addr}");
    case("Worker", name, want, async move { worker(&url).await.cancel(req).await.map(|_| ()) })
}

fn open_frame(job: &str, src: u32, dst: u32, secret: Vec<u8>) -> pb::PeerFrame {
    pb::PeerFrame { job_id: job.into(), src, dst, step: 0, tensors: Vec::new(), open: true, secret }
}

/// Opens a peer stream that sends `frames` and then, with `hold`, stays open sending nothing.
fn exchange_case(addr: &str, name: &str, want: &[Code], frames: Vec<pb::PeerFrame>, hold: bool) -> Case {
    let url = format!("http://{addr}");
    case("Peer", name, want, async move {
        use tokio_stream::StreamExt;
        let frames = tokio_stream::iter(frames);
        let mut client = peer(&url).await;
        let answer = if hold { client.exchange(frames.chain(tokio_stream::pending())).await } else { client.exchange(frames).await };
        drain(answer?.into_inner()).await
    })
}

// --- The suite ---

/// Public cases: malformed, oversized and nonsensical requests.
fn public_cases(addr: &str) -> Vec<Case> {
    let long_text = TEXT.repeat(30); // about 1,300 tokens: past MiniLM's 512 positions
    let mut cases = vec![
        case("Tome", "Process: undecodable protobuf", &[Code::Internal], raw_call(addr.into(), "/tome.v1.Tome/Process", UNDECODABLE.to_vec())),
        case("Tome", "Tokenize: undecodable protobuf", &[Code::Internal], raw_call(addr.into(), "/tome.v1.Tome/Tokenize", UNDECODABLE.to_vec())),
        process_case(addr, "Process: no input", &[Code::InvalidArgument], pb::ProcessRequest::default()),
        process_case(addr, "Process: empty text", &[Code::InvalidArgument], text("", Default::default())),
        process_case(addr, "Process: whitespace only", &[Code::InvalidArgument], text(" \n\t ", Default::default())),
        process_case(addr, "Process: text not UTF-8", &[Code::InvalidArgument], text_request(b"\xff\xfe\xfd", Default::default())),
        process_case(addr, "Process: document over --max-document-bytes", &[Code::ResourceExhausted], text(&"a ".repeat(MAX_DOCUMENT_BYTES), Default::default())),
        process_case(addr, "Process: 1 MiB model name", &[Code::NotFound], pb::ProcessRequest { model: "m".repeat(1 << 20), ..text(TEXT, Default::default()) }),
        process_case(
            addr,
            "Process: message over --max-message-bytes",
            &[Code::OutOfRange, Code::ResourceExhausted],
            pb::ProcessRequest { model: "m".repeat(COORDINATOR_MAX_MESSAGE + 1), ..text(TEXT, Default::default()) },
        ),
        process_case(addr, "Process: ranks over --max-ranks", &[Code::ResourceExhausted], text(TEXT, opts(|o| o.ranks = 9))),
        process_case(addr, "Process: ranks u32::MAX", &[Code::ResourceExhausted], text(TEXT, opts(|o| o.ranks = u32::MAX))),
        process_case(addr, "Process: ranks 0 (the server's default)", &[Code::Ok], text(TEXT, opts(|o| o.ranks = 0))),
        process_case(addr, "Process: unknown output", &[Code::InvalidArgument], text(TEXT, opts(|o| o.outputs = vec![99]))),
        process_case(addr, "Process: OUTPUT_UNSPECIFIED", &[Code::InvalidArgument], text(TEXT, opts(|o| o.outputs = vec![0]))),
        process_case(addr, "Process: unknown pooling", &[Code::InvalidArgument], text(TEXT, opts(|o| o.pooling = 99))),
        process_case(addr, "Process: unknown layout", &[Code::InvalidArgument], text(TEXT, opts(|o| o.layout = -1))),
        process_case(addr, "Process: unknown position extension", &[Code::InvalidArgument], text(TEXT, opts(|o| o.position_extension = 7))),
        process_case(addr, "Process: unknown precision", &[Code::InvalidArgument], text(TEXT, opts(|o| o.precision = 7))).saying("options.precision"),
        process_case(
            addr,
            "Process: unknown attention kind",
            &[Code::InvalidArgument],
            text(TEXT, opts(|o| o.attention = Some(pb::AttentionOverride { kind: 99, ..Default::default() }))),
        ),
        process_case(addr, "Process: unknown hidden dtype", &[Code::InvalidArgument], text(TEXT, opts(|o| o.hidden_dtype = 99))),
        process_case(
            addr,
            "Process: odd window",
            &[Code::InvalidArgument],
            text(TEXT, opts(|o| o.attention = Some(pb::AttentionOverride { kind: pb::AttentionKind::Window as i32, window: 7, ..Default::default() }))),
        ),
        process_case(
            addr,
            "Process: window 0",
            &[Code::InvalidArgument],
            text(TEXT, opts(|o| o.attention = Some(pb::AttentionOverride { kind: pb::AttentionKind::Window as i32, window: 0, ..Default::default() }))),
        ),
        process_case(
            addr,
            "Process: block-sparse block u32::MAX from a request",
            &[Code::InvalidArgument],
            text(TEXT, opts(|o| o.attention = Some(pb::AttentionOverride { kind: pb::AttentionKind::BlockSparse as i32, block_size: u32::MAX, ..Default::default() }))),
        ),
        process_case(
            addr,
            "Process: global token outside the document",
            &[Code::InvalidArgument],
            text(
                TEXT,
                opts(|o| {
                    o.attention = Some(pb::AttentionOverride { kind: pb::AttentionKind::Window as i32, window: 8, ..Default::default() });
                    o.global_tokens = vec![u64::MAX];
                }),
            ),
        ),
        process_case(addr, "Process: hidden layer 99 of 6", &[Code::InvalidArgument], text(TEXT, opts(|o| o.hidden_layer = Some(99)))),
        process_case(addr, "Process: log-probs of an encoder", &[Code::InvalidArgument], text(TEXT, opts(|o| o.outputs = vec![pb::Output::LogProbs as i32]))),
        process_case(
            addr,
            "Process: token ids out of the vocabulary",
            &[Code::InvalidArgument],
            pb::ProcessRequest { input: Some(pb::process_request::Input::TokenIds(pb::TokenIds { ids: vec![101, 999_999_999, 102] })), ..Default::default() },
        ),
        process_case(
            addr,
            "Process: token id -1",
            &[Code::InvalidArgument],
            pb::ProcessRequest { input: Some(pb::process_request::Input::TokenIds(pb::TokenIds { ids: vec![101, -1, 102] })), ..Default::default() },
        ),
        process_case(
            addr,
            "Process: no token ids",
            &[Code::InvalidArgument],
            pb::ProcessRequest { input: Some(pb::process_request::Input::TokenIds(pb::TokenIds { ids: vec![] })), ..Default::default() },
        ),
        process_case(addr, "Process: past the positions, no position extension", &[Code::InvalidArgument], text(&long_text, Default::default())),
        process_case(
            addr,
            "Process: tokens_per_chunk 0",
            &[Code::InvalidArgument],
            text(TEXT, opts(|o| o.chunks = Some(pb::ChunkSpec { spec: Some(pb::chunk_spec::Spec::TokensPerChunk(0)) }))),
        ),
        process_case(
            addr,
            "Process: chunk span descending",
            &[Code::InvalidArgument],
            text(TEXT, opts(|o| o.chunks = Some(pb::ChunkSpec { spec: Some(pb::chunk_spec::Spec::Spans(pb::TokenSpans { spans: vec![span(9, 3)] })) }))),
        ),
        process_case(
            addr,
            "Process: chunk span past the document",
            &[Code::InvalidArgument],
            text(TEXT, opts(|o| o.chunks = Some(pb::ChunkSpec { spec: Some(pb::chunk_spec::Spec::Spans(pb::TokenSpans { spans: vec![span(0, u64::MAX)] })) }))),
        ),
        process_case(
            addr,
            "Process: 70,000 chunk spans",
            &[Code::InvalidArgument],
            text(TEXT, opts(|o| o.chunks = Some(pb::ChunkSpec { spec: Some(pb::chunk_spec::Spec::Spans(pb::TokenSpans { spans: vec![span(0, 1); 70_000] })) }))),
        ),
        process_case(
            addr,
            "Process: hidden states as u8",
            &[Code::InvalidArgument],
            text(
                TEXT,
                opts(|o| {
                    o.outputs = vec![pb::Output::HiddenStates as i32];
                    o.hidden_dtype = pb::ElementType::U8 as i32;
                }),
            ),
        ),
        process_case(
            addr,
            "Process: hidden states as u32",
            &[Code::InvalidArgument],
            text(
                TEXT,
                opts(|o| {
                    o.outputs = vec![pb::Output::HiddenStates as i32];
                    o.hidden_dtype = pb::ElementType::U32 as i32;
                }),
            ),
        ),
    ];
    let a = addr.to_string();
    cases.push(case("Tome", "Tokenize: 1 MiB model name", &[Code::NotFound], async move {
        tome(&a).await.tokenize(pb::TokenizeRequest { model: "m".repeat(1 << 20), ..Default::default() }).await.map(|_| ())
    }));
    let upload = |name: &str, want: &[Code], parts: Vec<pb::upload_chunk::Part>| {
        let a = addr.to_string();
        let chunks: Vec<pb::UploadChunk> = parts.into_iter().map(|p| pb::UploadChunk { part: Some(p) }).collect();
        case("Tome", name, want, async move { drain(tome(&a).await.process_upload(tokio_stream::iter(chunks)).await?.into_inner()).await })
    };
    use pb::upload_chunk::Part;
    cases.push(upload("ProcessUpload: first message is text", &[Code::InvalidArgument], vec![Part::Text(TEXT.into())]).saying("must start with its request"));
    cases.push(upload("ProcessUpload: no messages", &[Code::InvalidArgument], vec![]));
    cases.push(upload("ProcessUpload: two requests", &[Code::InvalidArgument], vec![Part::Request(Default::default()), Part::Request(Default::default())]));
    cases.push(upload(
        "ProcessUpload: text over --max-document-bytes",
        &[Code::ResourceExhausted],
        vec![Part::Request(Default::default()), Part::Text(vec![b'a'; MAX_DOCUMENT_BYTES]), Part::Text(vec![b'a'; 1000])],
    ));
    cases.push(upload(
        "ProcessUpload: one message over --max-message-bytes",
        &[Code::ResourceExhausted],
        vec![Part::Request(Default::default()), Part::Text(vec![b'a'; COORDINATOR_MAX_MESSAGE + 1])],
    ));
    cases.push(upload(
        "ProcessUpload: token ids",
        &[Code::InvalidArgument],
        vec![Part::Request(pb::ProcessRequest { input: Some(pb::process_request::Input::TokenIds(pb::TokenIds { ids: vec![101, 102] })), ..Default::default() })],
    ));
    cases
}

/// Public cases on a server that takes only callers with an API key.
fn api_key_cases(addr: &str, key: &'static str) -> Vec<Case> {
    let call = |name: &str, want: &[Code], header: Option<String>| {
        let a = addr.to_string();
        case("Tome", name, want, async move {
            let mut req = tonic::Request::new(text(TEXT, Default::default()));
            if let Some(h) = header {
                req.metadata_mut().insert("authorization", h.parse().unwrap());
            }
            drain(tome(&a).await.process(req).await?.into_inner()).await
        })
    };
    vec![
        call("API keys: no key", &[Code::Unauthenticated], None),
        call("API keys: a wrong key", &[Code::Unauthenticated], Some("Bearer nobody-0123456789abcdef".into())),
        call("API keys: not a bearer header", &[Code::Unauthenticated], Some(format!("Basic {key}"))),
        call("API keys: a 6 KiB key", &[Code::Unauthenticated], Some(format!("Bearer {}", "k".repeat(6 << 10)))),
        call("API keys: the right key", &[Code::Ok], Some(format!("Bearer {key}"))),
        case("Tome", "API keys: undecodable protobuf without a key", &[Code::Unauthenticated], raw_call(addr.into(), "/tome.v1.Tome/Process", UNDECODABLE.to_vec())),
    ]
}

/// Internal cases against a worker called directly (plaintext on loopback).
fn worker_cases(addr: &str) -> Vec<Case> {
    let url = format!("http://{addr}");
    let base = |job: &str| shard(addr, job);
    let with = |job: &str, f: &dyn Fn(&mut pb::ShardRequest)| {
        let mut r = shard(addr, job);
        f(&mut r);
        r
    };
    let plan = |job: &str, f: &dyn Fn(&mut pb::JobPlan)| {
        let mut r = shard(addr, job);
        if let Some(p) = r.plan.as_mut() {
            f(p);
        }
        r
    };
    let ranges = |rs: Vec<Vec<pb::Span>>| rs.into_iter().map(|ranges| pb::RankRanges { ranges }).collect::<Vec<_>>();
    let two_addresses = vec![addr.to_string(), addr.to_string()];
    let layer = |a: pb::AttentionOverride| move |r: &mut pb::ShardRequest| r.layers = vec![a.clone(); LAYERS];
    let inv = &[Code::InvalidArgument][..];
    vec![
        case("Worker", "RunShard: undecodable protobuf", &[Code::Internal], raw_call(url.clone(), "/tome.v1.Worker/RunShard", UNDECODABLE.to_vec())),
        run_shard_case(addr, "RunShard: a sound 1-rank shard (the base of every case)", &[Code::Ok], base("h-sound")),
        run_shard_case(addr, "RunShard: no plan", inv, with("h-noplan", &|r| r.plan = None)),
        run_shard_case(
            addr,
            "RunShard: plan of 2^62 tokens",
            inv,
            plan("h-huge", &|p| {
                p.tokens = 1 << 62;
                p.shards = vec![pb::RankRanges { ranges: vec![span(0, 1 << 62)] }];
            }),
        ),
        run_shard_case(
            addr,
            "RunShard: plan of 0 tokens",
            inv,
            plan("h-zero", &|p| {
                p.tokens = 0;
                p.shards = vec![pb::RankRanges { ranges: vec![] }];
            }),
        ),
        run_shard_case(
            addr,
            "RunShard: plan of zero ranks",
            inv,
            plan("h-noranks", &|p| {
                p.shards.clear();
                p.rank_addresses.clear();
            }),
        ),
        run_shard_case(
            addr,
            "RunShard: ranges overlapping",
            inv,
            plan("h-overlap", &|p| {
                p.shards = ranges(vec![vec![span(0, 5)], vec![span(4, 8)]]);
                p.rank_addresses = two_addresses.clone();
            }),
        ),
        run_shard_case(
            addr,
            "RunShard: ranges with a gap",
            inv,
            plan("h-gap", &|p| {
                p.shards = ranges(vec![vec![span(0, 3)], vec![span(4, 8)]]);
                p.rank_addresses = two_addresses.clone();
            }),
        ),
        run_shard_case(addr, "RunShard: ranges descending", inv, plan("h-desc", &|p| p.shards = ranges(vec![vec![span(4, 8), span(0, 4)]]))),
        run_shard_case(addr, "RunShard: an empty range", inv, plan("h-empty", &|p| p.shards = ranges(vec![vec![span(0, 8), span(8, 8)]]))),
        run_shard_case(addr, "RunShard: rank 1 of 1", inv, with("h-rank", &|r| r.rank = 1)),
        run_shard_case(addr, "RunShard: 2 rank addresses for 1 rank", inv, plan("h-addrs", &|p| p.rank_addresses = two_addresses.clone())),
        run_shard_case(
            addr,
            "RunShard: block-sparse block u32::MAX",
            inv,
            with("h-block", &layer(pb::AttentionOverride { kind: pb::AttentionKind::BlockSparse as i32, block_size: u32::MAX, random_blocks: u32::MAX, ..Default::default() })),
        ),
        run_shard_case(
            addr,
            "RunShard: FAVOR+ of 2^31 features",
            inv,
            with("h-favor", &layer(pb::AttentionOverride { kind: pb::AttentionKind::Favor as i32, features: 1 << 31, ..Default::default() })),
        ),
        run_shard_case(
            addr,
            "RunShard: window u32::MAX - 1 (the whole document)",
            &[Code::Ok],
            with("h-window", &layer(pb::AttentionOverride { kind: pb::AttentionKind::Window as i32, window: u32::MAX - 1, ..Default::default() })),
        ),
        run_shard_case(
            addr,
            "RunShard: odd window u32::MAX",
            inv,
            with("h-oddwindow", &layer(pb::AttentionOverride { kind: pb::AttentionKind::Window as i32, window: u32::MAX, ..Default::default() })),
        ),
        run_shard_case(
            addr,
            "RunShard: unknown native attention (100 kB name)",
            inv,
            with("h-native", &layer(pb::AttentionOverride { kind: pb::AttentionKind::Native as i32, native: "n".repeat(100_000), ..Default::default() })),
        ),
        run_shard_case(
            addr,
            "RunShard: 5 layers for a 6-layer model",
            inv,
            with("h-layers", &|r| {
                r.layers.pop();
            }),
        ),
        run_shard_case(addr, "RunShard: global token outside the plan", inv, with("h-global", &|r| r.global_tokens = vec![8])),
        run_shard_case(addr, "RunShard: output layer 7 of 6", inv, with("h-outlayer", &|r| r.output_layer = Some(7))),
        run_shard_case(addr, "RunShard: 7 token ids for 8 tokens", inv, with("h-ids", &|r| r.token_ids = Some(u32_tensor(&[101; 7])))),
        run_shard_case(addr, "RunShard: no position ids", inv, with("h-pos", &|r| r.position_ids = None)),
        run_shard_case(addr, "RunShard: token ids as f32", inv, with("h-f32", &|r| r.token_ids.as_mut().unwrap().dtype = pb::ElementType::F32 as i32)),
        run_shard_case(addr, "RunShard: token ids of shape [2^62]", inv, with("h-shape", &|r| r.token_ids.as_mut().unwrap().shape = vec![1 << 62])),
        run_shard_case(
            addr,
            "RunShard: token id out of the vocabulary",
            inv,
            with("h-vocab", &|r| r.token_ids = Some(u32_tensor(&[101, 2009, 2001, u32::MAX, 2190, 1997, 2335, 102]))),
        ),
        run_shard_case(addr, "RunShard: position id past the positions", inv, with("h-posid", &|r| r.position_ids = Some(u32_tensor(&[0, 1, 2, 3, 4, 5, 6, u32::MAX])))),
        run_shard_case(addr, "RunShard: job id of 1 MiB", inv, plan("h-bigid", &|p| p.job_id = "j".repeat(1 << 20))).saying("job id"),
        run_shard_case(addr, "RunShard: empty job id", inv, plan("h-noid", &|p| p.job_id.clear())),
        run_shard_case(addr, "RunShard: no secret", inv, plan("h-nosecret", &|p| p.secret.clear())).saying("plan.secret"),
        run_shard_case(addr, "RunShard: a 31-byte secret", inv, plan("h-shortsecret", &|p| p.secret.truncate(31))).saying("plan.secret"),
        run_shard_case(addr, "RunShard: a 1 MiB secret", inv, plan("h-longsecret", &|p| p.secret = vec![1; 1 << 20])).saying("plan.secret"),
        run_shard_case(addr, "RunShard: unknown transport", inv, plan("h-transport", &|p| p.transport = 9)),
        run_shard_case(addr, "RunShard: NCCL on a worker without GPUs", &[Code::FailedPrecondition], plan("h-nccl", &|p| p.transport = pb::Transport::Nccl as i32)),
        run_shard_case(addr, "RunShard: 70,000 pool spans", inv, with("h-spans", &|r| r.pool_spans = vec![span(0, 1); 70_000])),
        run_shard_case(addr, "RunShard: pool span past the plan", inv, with("h-span", &|r| r.pool_spans = vec![span(0, 9)])),
        run_shard_case(addr, "RunShard: unknown pooling", inv, with("h-pooling", &|r| r.pooling = 9)),
        run_shard_case(addr, "RunShard: unknown precision", inv, with("h-precision", &|r| r.precision = 7)).saying("precision"),
        run_shard_case(
            addr,
            "RunShard: log-probs of an encoder",
            inv,
            with("h-logprobs", &|r| {
                r.log_probs = true;
                r.next_ids = Some(u32_tensor(&[1; 7]));
            }),
        ),
        run_shard_case(addr, "RunShard: 1 MiB model name", &[Code::NotFound], with("h-model", &|r| r.model = "m".repeat(1 << 20))),
        run_shard_case(
            addr,
            "RunShard: message over --max-message-bytes",
            &[Code::OutOfRange, Code::ResourceExhausted],
            with("h-big", &|r| {
                r.model = "m".repeat(TARGET_MAX_MESSAGE + 1);
            }),
        ),
        cancel_case(addr, "Cancel: job id of 1 MiB", inv, pb::CancelRequest { job_id: "j".repeat(1 << 20), secret: secret(7) }),
        cancel_case(addr, "Cancel: no secret", inv, pb::CancelRequest { job_id: "h-cancel".into(), secret: vec![] }),
        cancel_case(addr, "Cancel: a job that does not run here", &[Code::Ok], pb::CancelRequest { job_id: "h-cancel".into(), secret: secret(7) }),
    ]
}

/// Internal cases against a worker's peer hub.
fn peer_cases(addr: &str) -> Vec<Case> {
    let inv = &[Code::InvalidArgument][..];
    let within = Duration::from_secs(3 + 10);
    let big = pb::Tensor { shape: vec![TARGET_MAX_MESSAGE as u64], dtype: pb::ElementType::U8 as i32, data: vec![0; TARGET_MAX_MESSAGE + 1] };
    vec![
        case("Peer", "Exchange: undecodable protobuf", &[Code::Internal], raw_call(format!("http://{addr}"), "/tome.v1.Peer/Exchange", UNDECODABLE.to_vec())),
        exchange_case(addr, "Exchange: a stream that sends nothing and stays open", &[Code::DeadlineExceeded], vec![], true).saying("no open frame").within(within),
        exchange_case(addr, "Exchange: a stream that ends without a frame", inv, vec![], false),
        exchange_case(addr, "Exchange: first frame not an open frame", inv, vec![pb::PeerFrame { open: false, ..open_frame("h-peer", 0, 1, secret(7)) }], true),
        exchange_case(addr, "Exchange: open frame with tensors", inv, vec![pb::PeerFrame { tensors: vec![u32_tensor(&[1])], ..open_frame("h-peer", 0, 1, secret(7)) }], true),
        exchange_case(addr, "Exchange: open frame with a 1 MiB job id", inv, vec![open_frame(&"j".repeat(1 << 20), 0, 1, secret(7))], true).saying("job id"),
        exchange_case(addr, "Exchange: open frame for a job that never joins", &[Code::NotFound], vec![open_frame("h-never", 0, 1, secret(7))], true).within(within),
        exchange_case(addr, "Exchange: open frame of dst u32::MAX", &[Code::NotFound], vec![open_frame("h-never", 0, u32::MAX, secret(7))], true).within(within),
        exchange_case(
            addr,
            "Exchange: first frame over --max-message-bytes",
            &[Code::ResourceExhausted],
            vec![pb::PeerFrame { tensors: vec![big], ..open_frame("h-peer", 0, 1, secret(7)) }],
            true,
        ),
    ]
}

/// Holders of a job's secret (cluster members) that send garbage: rank 0 of a 3-rank job runs on
/// the worker; a stream from rank 1 opens with the job's secret, then sends a frame whose job id
/// is 1 MiB long, and one from rank 2 a frame over the message limit. Both are refused with a
/// short message; the rank, whose peers never come, ends UNAVAILABLE.
fn member_cases(addr: &str) -> Vec<Case> {
    // Each kind of garbage goes to a job of its own: the first to fail its rank 0 must not turn
    // the other's case into a stream that finds no rank.
    let rank0 = |job: &str| {
        let mut rank0 = shard(addr, job);
        if let Some(p) = rank0.plan.as_mut() {
            p.shards = [span(0, 4), span(4, 6), span(6, 8)].into_iter().map(|s| pb::RankRanges { ranges: vec![s] }).collect();
            p.rank_addresses = vec![addr.to_string(); 3];
        }
        rank0.token_ids = Some(u32_tensor(&[101, 2009, 2001, 1996]));
        rank0.position_ids = Some(u32_tensor(&[0, 1, 2, 3]));
        rank0
    };
    let garbage = pb::PeerFrame { job_id: "j".repeat(1 << 20), src: 1, dst: 0, step: 0, tensors: Vec::new(), open: false, secret: Vec::new() };
    let long_id = exchange_case(
        addr,
        "Exchange: with the job's secret, then a frame with a 1 MiB job id",
        &[Code::InvalidArgument],
        vec![open_frame("h-member-a", 1, 0, secret(7)), garbage],
        true,
    );
    let big = pb::Tensor { shape: vec![TARGET_MAX_MESSAGE as u64], dtype: pb::ElementType::U8 as i32, data: vec![0; TARGET_MAX_MESSAGE + 1] };
    let huge = pb::PeerFrame { job_id: "h-member-b".into(), src: 2, dst: 0, step: 0, tensors: vec![big], open: false, secret: Vec::new() };
    let oversized = exchange_case(
        addr,
        "Exchange: with the job's secret, then a frame over --max-message-bytes",
        &[Code::ResourceExhausted],
        vec![open_frame("h-member-b", 2, 0, secret(7)), huge],
        true,
    );
    // Once rank 0 has joined.
    let later = |mut c: Case| {
        let call = std::mem::replace(&mut c.call, Box::pin(async { Ok(()) }));
        c.call = Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            call.await
        });
        c
    };
    let (url_a, url_b) = (format!("http://{addr}"), format!("http://{addr}"));
    let (rank0_a, rank0_b) = (rank0("h-member-a"), rank0("h-member-b"));
    vec![
        case("Worker", "RunShard: rank 0 of 3 whose peer sends a frame with a 1 MiB job id", &[Code::Unavailable], async move {
            drain(worker(&url_a).await.run_shard(rank0_a).await?.into_inner()).await
        }),
        case("Worker", "RunShard: rank 0 of 3 whose peer sends a frame over the limit", &[Code::Unavailable], async move {
            drain(worker(&url_b).await.run_shard(rank0_b).await?.into_inner()).await
        }),
        later(long_id).saying("out of sequence"),
        later(oversized),
    ]
}

/// Starts a job and reads its events until its first layer is done: (job id, the stream).
async fn start_job(client: &mut TomeClient<Channel>, req: pb::ProcessRequest) -> (String, tonic::Streaming<pb::ProcessEvent>) {
    let mut stream = client.process(req).await.unwrap().into_inner();
    let mut job = String::new();
    loop {
        match stream.message().await.unwrap().and_then(|e| e.event) {
            Some(pb::process_event::Event::Accepted(a)) => job = a.job_id,
            Some(pb::process_event::Event::Progress(_)) => return (job, stream),
            Some(_) => {}
            None => panic!("the job ended before its first layer"),
        }
    }
}

/// Reads a started job's stream to its end.
async fn finish(mut stream: tonic::Streaming<pb::ProcessEvent>) -> Result<Processed, Status> {
    let mut out = Processed::default();
    let floats = |t: Option<pb::Tensor>| -> Vec<f32> { t.unwrap().data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect() };
    while let Some(ev) = stream.message().await? {
        match ev.event {
            Some(pb::process_event::Event::Chunk(c)) => out.chunks.push(floats(c.embedding)),
            Some(pb::process_event::Event::Document(d)) => out.document = floats(d.embedding),
            Some(pb::process_event::Event::Done(d)) => out.done = Some(d),
            _ => {}
        }
    }
    Ok(out)
}

/// OK when `got` is `want`'s output, an error status saying how it differs otherwise.
fn same(got: Result<Processed, Status>, want: &Processed) -> Result<(), Status> {
    let got = got?;
    if got.done.is_none() {
        return Err(Status::data_loss("the job ended without Done"));
    }
    if got.document != want.document || got.chunks != want.chunks {
        return Err(Status::data_loss(format!("the output differs from the fault-free run's (document by {})", max_diff(&got.document, &want.document))));
    }
    Ok(())
}

async fn shards_running(addr: &str) -> u32 {
    match WorkerClient::connect(addr.to_string()).await {
        Ok(mut c) => c.info(pb::WorkerInfoRequest {}).await.map(|i| i.into_inner().shards_running).unwrap_or(0),
        Err(_) => 0,
    }
}

async fn wait_for_workers(client: &mut TomeClient<Channel>, n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
        if info.workers.len() == n {
            return;
        }
        assert!(Instant::now() < deadline, "the coordinator lists {:?}, not {n} workers", info.workers);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn signal(server: &Server, sig: libc::c_int) {
    // SAFETY: kill(2) on a child of this test; it reads no memory of ours.
    unsafe { libc::kill(server.child.id() as libc::pid_t, sig) };
}

fn book() -> String {
    let path = repo().join("data/books/plrabn12.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|_| TEXT.repeat(500));
    text[..text.len().min(60_000)].to_string()
}

/// The job every phase runs: window attention past the positions, chunks, 2 ranks.
fn job(text: &str) -> pb::ProcessRequest {
    let options = pb::ProcessOptions {
        attention: Some(pb::AttentionOverride { kind: pb::AttentionKind::Window as i32, window: 128, ..Default::default() }),
        position_extension: pb::PositionExtension::Tile as i32,
        chunks: Some(pb::ChunkSpec { spec: Some(pb::chunk_spec::Spec::TokensPerChunk(300)) }),
        ranks: 2,
        ..Default::default()
    };
    pb::ProcessRequest { model: String::new(), input: Some(pb::process_request::Input::Text(text.as_bytes().to_vec())), options: Some(options) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_requests_and_faults_get_their_codes_and_nothing_crashes_panics_or_hangs() {
    let Some(model) = minilm() else { return };
    let suite_started = Instant::now();
    let mut board = Board::default();
    let book = book();
    let small = TEXT.repeat(4);

    let etcd = Etcd::start().await;
    let worker_args = ["--peer-rendezvous-timeout-seconds", RENDEZVOUS_SECONDS, "--etcd", &etcd.endpoint, "--etcd-ttl-seconds", "2"];
    let mut workers = Vec::new();
    for i in 0..3 {
        workers.push(start_worker(&model, &worker_args, logs(&format!("w{i}"))).await);
    }
    let max_message = TARGET_MAX_MESSAGE.to_string();
    let target_args = ["--peer-rendezvous-timeout-seconds", RENDEZVOUS_SECONDS, "--max-message-bytes", &max_message];
    let mut target = start_worker(&model, &target_args, logs("target")).await;
    let list = workers.iter().map(|w| w.host_port.clone()).collect::<Vec<_>>().join(",");
    let max_doc = MAX_DOCUMENT_BYTES.to_string();
    let coordinator_max_message = COORDINATOR_MAX_MESSAGE.to_string();
    let coordinator_args = ["--workers", &list, "--probe-ms", "200", "--job-attempts", "3", "--max-document-bytes", &max_doc, "--max-message-bytes", &coordinator_max_message];
    let mut coordinator = start_coordinator(&model, &coordinator_args, logs("coordinator")).await;
    let mut etcd_coordinator = start_coordinator(&model, &["--etcd", &etcd.endpoint], logs("etcd-coordinator")).await;
    let keys = logs("api-keys");
    let key = "hostile-0123456789abcdef";
    std::fs::write(&keys, format!("hostile {key}\n")).unwrap();
    let model_arg = model.to_string_lossy().to_string();
    let keys_arg = keys.to_string_lossy().to_string();
    let keyed_args = ["run", "--model", &model_arg, "--ranks", "2", "--max-ranks", "8", "--api-keys-file", &keys_arg];
    let mut keyed = spawn_serving(&keyed_args, "tome.v1.Tome", Some(logs("keyed"))).await;
    let mut client = tome(&coordinator.addr).await;
    wait_for_workers(&mut client, 3, Duration::from_secs(30)).await;
    let mut etcd_client = tome(&etcd_coordinator.addr).await;
    wait_for_workers(&mut etcd_client, 3, Duration::from_secs(30)).await;
    println!("started in {:.1}s", suite_started.elapsed().as_secs_f64());

    // Fault-free references.
    let started = Instant::now();
    let want = process_call(&mut client, job(&book)).await.unwrap();
    println!("the book's job took {:.1}s", started.elapsed().as_secs_f64());
    let before = process_call(&mut client, job(&small)).await.unwrap();

    // Malformed, oversized and unauthenticated requests.
    board.run_in_turn(public_cases(&coordinator.addr)).await;
    board.run_in_turn(api_key_cases(&keyed.addr, key)).await;
    board.run_in_turn(worker_cases(&target.host_port)).await;
    board.run(peer_cases(&target.host_port)).await;
    board.run(member_cases(&target.host_port)).await;
    println!("hostile requests done at {:.1}s", suite_started.elapsed().as_secs_f64());

    // Cross-job access while a real job runs: its id, never its secret.
    let started = Instant::now();
    let (job_id, stream) = start_job(&mut client, job(&book)).await;
    let mut running = Vec::new();
    for w in &workers {
        if shards_running(&w.addr).await > 0 {
            running.push(w.host_port.clone());
        }
    }
    let mut cross = Vec::new();
    for addr in &running {
        cross.push(cancel_case(
            addr,
            &format!("Cancel: the running job's id, a wrong secret (on {addr})"),
            &[Code::PermissionDenied],
            pb::CancelRequest { job_id: job_id.clone(), secret: secret(9) },
        ));
        let mut again = shard(addr, &job_id);
        again.plan.as_mut().unwrap().secret = secret(9);
        cross.push(run_shard_case(addr, &format!("RunShard: the running job's id, another secret (on {addr})"), &[Code::PermissionDenied], again));
        for dst in 0..2 {
            // Only the worker hosting rank `dst` has it: the others answer NOT_FOUND after the
            // rendezvous timeout; which worker hosts which rank the test does not know.
            cross.push(
                exchange_case(
                    addr,
                    &format!("Exchange: open to rank {dst} of the running job, a wrong secret (on {addr})"),
                    &[Code::PermissionDenied, Code::NotFound],
                    vec![open_frame(&job_id, 1 - dst, dst, secret(9))],
                    true,
                )
                .within(Duration::from_secs(13)),
            );
        }
    }
    let first = board.rows.len();
    board.run(cross).await;
    let denied = board.rows[first..].iter().filter(|r| r.service == "Peer" && r.got == Some(Code::PermissionDenied)).count();
    let every_rank = if denied == 2 { Ok(()) } else { Err(Status::unknown(format!("{denied} of the job's 2 ranks refused a stranger's stream"))) };
    board.record("Peer", "Exchange: every rank of the running job refused the wrong secret", Code::Ok, every_rank, 0.0);
    board.record("Tome", "the job attacked by strangers gives the fault-free output", Code::Ok, same(finish(stream).await, &want), started.elapsed().as_secs_f64());
    assert_eq!(running.len(), 2, "the job did not run on 2 of the 3 workers: {running:?}");

    // etcd killed: the etcd coordinator serves on the workers it last saw.
    drop(etcd);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let got = tokio::time::timeout(HANG_AFTER, process_call(&mut etcd_client, job(&small))).await;
    board.record_job("etcd killed: a job on the last known membership", got.ok().map(|g| same(g, &before)), started.elapsed().as_secs_f64());

    // A worker killed mid-job: the job runs again on the live ones, to the same output.
    let started = Instant::now();
    let (_, stream) = start_job(&mut client, job(&book)).await;
    let victim = {
        let mut victim = None;
        for (i, w) in workers.iter().enumerate() {
            if shards_running(&w.addr).await > 0 {
                victim = Some(i);
            }
        }
        victim.expect("a worker runs the job")
    };
    workers[victim].child.kill().unwrap();
    let _ = workers[victim].child.wait();
    let got = tokio::time::timeout(FAULT_LIMIT, finish(stream)).await.ok().map(|g| same(g, &want));
    board.record_job("SIGKILL of a worker mid-job: rerun, the fault-free output", got, started.elapsed().as_secs_f64());
    let killed = workers.remove(victim);
    board.check_log("killed worker", &killed);
    wait_for_workers(&mut client, 2, Duration::from_secs(20)).await;

    // A silent peer: SIGSTOP keeps its sockets open and answers nothing. Keepalives (10 s) find
    // it; the job runs again on the live worker, to the same output.
    let started = Instant::now();
    let (_, stream) = start_job(&mut client, job(&book)).await;
    let mut silent = 0;
    for (i, w) in workers.iter().enumerate() {
        if shards_running(&w.addr).await > 0 {
            silent = i;
        }
    }
    signal(&workers[silent], libc::SIGSTOP);
    let got = tokio::time::timeout(FAULT_LIMIT, finish(stream)).await.ok().map(|g| same(g, &want));
    let seconds = started.elapsed().as_secs_f64();
    board.record_job("SIGSTOP of a worker mid-job (silent peer): rerun, the fault-free output", got, seconds);
    signal(&workers[silent], libc::SIGCONT);

    // Nothing lost: the same job gives the same output as before the hostile cases.
    wait_for_workers(&mut client, 2, Duration::from_secs(30)).await;
    let started = Instant::now();
    let after = process_call(&mut client, job(&small)).await;
    board.record("Tome", "after it all: the same job, the same output as before", Code::Ok, same(after, &before), started.elapsed().as_secs_f64());

    let mut servers: Vec<(&str, &mut Server)> =
        vec![("coordinator", &mut coordinator), ("etcd coordinator", &mut etcd_coordinator), ("keyed server", &mut keyed), ("target worker", &mut target)];
    for (i, w) in workers.iter_mut().enumerate() {
        servers.push((["worker a", "worker b"][i], w));
    }
    board.check_servers(&mut servers);
    board.print();
    println!("suite wall time {:.1}s", suite_started.elapsed().as_secs_f64());
    let counts = (board.crashes.len(), board.panics.len(), board.hangs(), board.wrong());
    assert_eq!(counts, (0, 0, 0, 0), "crashes, panics, hangs, wrong codes or messages (the table above says which)");
}
