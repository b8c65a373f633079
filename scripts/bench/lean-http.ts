// A lean HTTP/1.1 load generator for the ratio bench (scripts/bench/ingest.ts, `--only ratios`), as wrk
// and autocannon are: keep-alive connections, one request at a time on each (no pipelining), each request
// one write of its head and body, each answer read by its status line, Content-Length or chunked body.
// The bench's API side and the load it measures share the machine's cores: node:http's client spent
// 0.129 ms of CPU a single-reading request on two cores (docs/benchmarks.md), a third of what raw
// Postgres' whole transaction costs there, so a ratio measured with it was in part a measure of the
// client. Raw's side uses node-postgres, a lean client of its own protocol; this gives the API side one.
// `--ratio-node-http` measures the node:http client beside it in the same run.
import { connect, type Socket } from 'node:net';
import type { HttpResult } from './harness.js';

const HEAD_END = Buffer.from('\r\n\r\n');
const CRLF = Buffer.from('\r\n');

/** What the answer's head says of its body. */
interface Head {
  status: number;
  bodyStart: number;
  contentLength: number | undefined;
  chunked: boolean;
  close: boolean;
}

function readHead(buf: Buffer, end: number): Head {
  const text = buf.toString('latin1', 0, end);
  const status = Number(text.slice(9, 12));
  let contentLength: number | undefined;
  let chunked = false;
  let close = false;
  for (const line of text.split('\r\n').slice(1)) {
    const colon = line.indexOf(':');
    if (colon < 0) continue;
    const name = line.slice(0, colon).trim().toLowerCase();
    const value = line
      .slice(colon + 1)
      .trim()
      .toLowerCase();
    if (name === 'content-length') contentLength = Number(value);
    else if (name === 'transfer-encoding') chunked = value.includes('chunked');
    else if (name === 'connection') close = value === 'close';
  }
  return { status, bodyStart: end + 4, contentLength, chunked, close };
}

/** The body of a chunked answer when `buf` holds all of it (from `start`); undefined while more is to come. */
function readChunked(buf: Buffer, start: number): Buffer | undefined {
  const parts: Buffer[] = [];
  let at = start;
  for (;;) {
    const lineEnd = buf.indexOf(CRLF, at);
    if (lineEnd < 0) return undefined;
    const size = Number.parseInt(buf.toString('latin1', at, lineEnd).split(';')[0]!, 16);
    if (!Number.isFinite(size)) throw new Error('bad chunk size');
    if (size === 0) {
      // Trailers (none expected) end with an empty line.
      const trailerEnd = buf.indexOf(CRLF, lineEnd + 2);
      if (trailerEnd < 0) return undefined;
      return Buffer.concat(parts);
    }
    if (buf.length < lineEnd + 2 + size + 2) return undefined;
    parts.push(buf.subarray(lineEnd + 2, lineEnd + 2 + size));
    at = lineEnd + 2 + size + 2;
  }
}

/** One keep-alive connection and its request in flight. */
class Connection {
  readonly socket: Socket;
  private buf: Buffer = Buffer.alloc(0);
  private pending: ((r: { status: number; body: string }) => void) | undefined;
  closed = false;

  constructor(host: string, port: number) {
    this.socket = connect(port, host);
    this.socket.setNoDelay(true);
    this.socket.on('data', (chunk: Buffer) => this.onData(chunk));
    const fail = (why: string) => {
      this.closed = true;
      const pending = this.pending;
      this.pending = undefined;
      pending?.({ status: -1, body: why });
    };
    this.socket.on('error', (err) => fail(err.message));
    this.socket.on('close', () => fail('connection closed'));
  }

  send(request: Buffer, timeoutMs: number): Promise<{ status: number; body: string }> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => this.socket.destroy(new Error('timeout')), timeoutMs);
      this.pending = (r) => {
        clearTimeout(timer);
        resolve(r);
      };
      this.buf = Buffer.alloc(0);
      this.socket.write(request);
    });
  }

  private onData(chunk: Buffer): void {
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
    const headEnd = this.buf.indexOf(HEAD_END);
    if (headEnd < 0 || !this.pending) return;
    let head: Head;
    let body: Buffer;
    try {
      head = readHead(this.buf, headEnd);
      if (head.chunked) {
        const read = readChunked(this.buf, head.bodyStart);
        if (!read) return;
        body = read;
      } else {
        const length = head.contentLength ?? 0;
        if (this.buf.length < head.bodyStart + length) return;
        body = this.buf.subarray(head.bodyStart, head.bodyStart + length);
      }
    } catch (err) {
      this.socket.destroy(err instanceof Error ? err : new Error(String(err)));
      return;
    }
    const pending = this.pending;
    this.pending = undefined;
    this.buf = Buffer.alloc(0);
    if (head.close) {
      this.closed = true;
      this.socket.end();
    }
    pending({ status: head.status, body: body.toString() });
  }
}

/** HttpClient's postJson over lean keep-alive connections (at most `maxSockets`; the rest queue). */
export class LeanHttpClient {
  private readonly host: string;
  private readonly port: number;
  private readonly idle: Connection[] = [];
  private readonly all = new Set<Connection>();
  private readonly queue: ((c: Connection) => void)[] = [];

  constructor(
    readonly base: string,
    private readonly maxSockets = 64,
  ) {
    const url = new URL(base);
    this.host = url.hostname;
    this.port = Number(url.port);
  }

  private take(): Promise<Connection> {
    for (let c = this.idle.pop(); c; c = this.idle.pop()) if (!c.closed) return Promise.resolve(c);
    for (const c of this.all) if (c.closed) this.all.delete(c);
    if (this.all.size < this.maxSockets) {
      const c = new Connection(this.host, this.port);
      this.all.add(c);
      return Promise.resolve(c);
    }
    return new Promise((resolve) => this.queue.push(resolve));
  }

  private give(c: Connection): void {
    if (c.closed) {
      this.all.delete(c);
      const next = this.queue.shift();
      if (next) void this.take().then(next);
      return;
    }
    const next = this.queue.shift();
    if (next) next(c);
    else this.idle.push(c);
  }

  async postJson(
    path: string,
    body: string,
    apiKey: string,
    extra: Record<string, string> = {},
    timeoutMs = 30_000,
  ): Promise<HttpResult> {
    const started = performance.now();
    let head =
      `POST ${path} HTTP/1.1\r\nhost: ${this.host}:${this.port}\r\nauthorization: Bearer ${apiKey}\r\n` +
      `content-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n`;
    for (const [name, value] of Object.entries(extra)) head += `${name}: ${value}\r\n`;
    const request = Buffer.from(`${head}\r\n${body}`);
    const c = await this.take();
    const r = await c.send(request, timeoutMs);
    this.give(c);
    return { status: r.status, body: r.body, ms: performance.now() - started, at: Date.now() };
  }

  close(): void {
    for (const c of this.all) c.socket.destroy();
    this.all.clear();
    this.idle.length = 0;
  }
}
