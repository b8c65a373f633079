// Fault injection: probabilities per kind, added latency (fixed plus random 0..jitter ms), an
// optional script of outcomes consumed first, and the endpoints they apply to (ingest only by
// default). Every decision draws from one seeded PRNG in a fixed order, so the same seed and the
// same sequence of calls give the same faults.
import { z } from 'zod';
import { createPrng, type Prng } from './prng.js';

export const FAULT_KINDS = [
  'reset',
  'timeout',
  'error_500',
  'error_503',
  'rate_limit_429',
  'accepted_then_500',
  'accepted_then_reset',
] as const;
export type FaultKind = (typeof FAULT_KINDS)[number];
/** `none` in a script means "this call goes through untouched". */
export type ScriptStep = FaultKind | 'none';

/** The API surfaces faults can be aimed at. */
export const FAULT_ENDPOINTS = ['ingest', 'usage', 'search', 'customers', 'billable_metrics'] as const;
export type FaultEndpoint = (typeof FAULT_ENDPOINTS)[number];

const rate = z.number().min(0).max(1);

export const faultsSchema = z
  .object({
    /** 500 before anything is recorded. */
    errorRate: rate.default(0),
    /** 503 before anything is recorded. */
    unavailableRate: rate.default(0),
    /** 429 before anything is recorded. */
    rateLimitRate: rate.default(0),
    /** The socket is destroyed without a response, before anything is recorded. */
    resetRate: rate.default(0),
    /** The request hangs for hangMs (longer than the client's timeout), then the socket is destroyed. */
    timeoutRate: rate.default(0),
    /** The events are recorded, then the client gets a 500: only transaction_id dedupe prevents double billing. */
    acceptedThen500Rate: rate.default(0),
    /** The events are recorded, then the socket is destroyed (the SDK retries a connection error). */
    acceptedThenResetRate: rate.default(0),
    latencyMs: z.number().int().min(0).max(600_000).default(0),
    /** A random 0..jitterMs added to latencyMs on every faultable call. */
    jitterMs: z.number().int().min(0).max(600_000).default(0),
    hangMs: z.number().int().min(0).max(3_600_000).default(30_000),
    /** A `Retry-After` header (seconds) on the injected 429 and 503 answers; 0: none. */
    retryAfterSeconds: z.number().int().min(0).max(86_400).default(0),
    /** Outcomes used in order for the next faultable calls, before the rates apply. */
    script: z.array(z.enum([...FAULT_KINDS, 'none'])).default([]),
    /** Which endpoints the faults and the latency apply to. */
    endpoints: z.array(z.enum(FAULT_ENDPOINTS)).default(['ingest']),
  })
  .refine(
    (f) =>
      f.errorRate +
        f.unavailableRate +
        f.rateLimitRate +
        f.resetRate +
        f.timeoutRate +
        f.acceptedThen500Rate +
        f.acceptedThenResetRate <=
      1 + 1e-9,
    { message: 'the fault rates must add up to at most 1' },
  );

export type Faults = z.output<typeof faultsSchema>;
export type FaultsInput = z.input<typeof faultsSchema>;

export interface FaultDecision {
  kind: FaultKind | 'none';
  delayMs: number;
}

export const NO_FAULT: FaultDecision = Object.freeze({ kind: 'none', delayMs: 0 });

export class FaultInjector {
  private prng: Prng;
  private faults: Faults;
  private script: ScriptStep[];

  constructor(faults: FaultsInput, seed: number) {
    this.prng = createPrng(seed);
    this.faults = faultsSchema.parse(faults);
    this.script = [...this.faults.script];
  }

  get current(): Faults {
    return { ...this.faults, script: [...this.script], endpoints: [...this.faults.endpoints] };
  }

  get seed(): number {
    return this.prng.seed;
  }

  /** Replaces the fault settings; a seed restarts the PRNG so the next draws repeat a run. */
  set(faults: FaultsInput, seed?: number): Faults {
    this.faults = faultsSchema.parse(faults);
    this.script = [...this.faults.script];
    if (seed !== undefined) this.prng = createPrng(seed);
    return this.current;
  }

  /**
   * The outcome of one call to `endpoint`. Calls outside the configured endpoints draw nothing; the
   * others draw exactly twice (jitter, kind) whatever the outcome, so runs stay aligned.
   */
  decide(endpoint: FaultEndpoint): FaultDecision {
    const f = this.faults;
    if (!f.endpoints.includes(endpoint)) return NO_FAULT;
    const jitterDraw = this.prng.next();
    const kindDraw = this.prng.next();
    const delayMs = f.latencyMs + Math.floor(jitterDraw * (f.jitterMs + 1));
    const scripted = this.script.shift();
    if (scripted !== undefined) return { kind: scripted, delayMs };
    const table: [FaultKind, number][] = [
      ['reset', f.resetRate],
      ['timeout', f.timeoutRate],
      ['error_500', f.errorRate],
      ['error_503', f.unavailableRate],
      ['rate_limit_429', f.rateLimitRate],
      ['accepted_then_500', f.acceptedThen500Rate],
      ['accepted_then_reset', f.acceptedThenResetRate],
    ];
    let edge = 0;
    for (const [kind, p] of table) {
      edge += p;
      if (kindDraw < edge) return { kind, delayMs };
    }
    return { kind: 'none', delayMs };
  }
}
