// What meterbox's two emulators share (packages/stripe-emulator, packages/metronome-emulator): each
// keeps its destination's rules, words and error shapes, and takes the machinery from here.
export { type CliTools, cliTools, FAULT_FLAGS, faultFlags, runCli, stopOnSignal } from './cli.js';
export { registerFaultRoutes } from './control.js';
export {
  destroy,
  type EarlyAnswers,
  type FaultCounters,
  type FaultRuntime,
  faultAfter,
  faultBefore,
  sleep,
  zeroFaultCounters,
} from './fault-answers.js';
export {
  COMMON_FAULT_KINDS,
  commonFaultFields,
  type FaultDecision,
  FaultInjector,
  faultRate,
  ratesAddUp,
  type ScriptedFaults,
} from './faults.js';
export { type ApiErrors, type App, type Ctx, createApp, type Env } from './http.js';
export {
  IDEMPOTENCY_TTL_MS,
  type IdempotencyErrors,
  type IdempotencyLookup,
  IdempotencyStore,
} from './idempotency.js';
export { createLog, type EmulatorLogEntry, type Log } from './log.js';
export { createPrng, type Prng } from './prng.js';
export { RateLimiter } from './rate-limiter.js';
export { type Listening, listen } from './server.js';
export { manualClock } from './testing.js';
