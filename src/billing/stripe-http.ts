// The Stripe SDK's HTTP client, with the one resend the SDK makes on its own held to the call's
// timeout. Stripe's SDK resends a call once when its connection closed without an answer (ECONNRESET,
// EPIPE), whatever maxNetworkRetries says (RequestSender._shouldRetry: "a closed connection is retried
// once even when retries are disabled"), mostly a keep-alive connection the server closed as the call
// went out. Its resend gets a whole timeout of its own and goes out however late: a worker frozen past
// its lease, whose idle connection the server closed meanwhile, woke and resent its call 1.7 s later,
// while the key's next owner had its own call in flight (test/e2e/frozen-workers.test.ts). meterbox's
// calls go out only under their key's lease and end (their timeout) before it does
// (src/metering/calls.ts), so here the resend is made by this client, at most once, only while the
// call's own timeout has time left (RESEND_MIN_MS) and with what is left of it: the call still ends
// when its first attempt would have, and a process that froze past its timeout resends nothing (its
// outcome is `network`; delivery resends the same identifier later, under a lease). The SDK's own
// resend never happens: the error it sees has a code it does not resend.
import Stripe from 'stripe';

/** The error codes the SDK resends on its own (HttpClient.CONNECTION_CLOSED_ERROR_CODES). */
const RESENT_BY_THE_SDK: readonly string[] = Stripe.HttpClient.CONNECTION_CLOSED_ERROR_CODES;

/** Least of the call's timeout left for a resend worth sending. */
export const RESEND_MIN_MS = 500;

/** The connection closed without an answer, under a code the SDK does not resend on its own. */
export class ConnectionClosedError extends Error {
  readonly code: string;
  constructor(cause: Error & { code: string }) {
    super(`the connection closed without an answer (${cause.code}): ${cause.message}`, { cause });
    this.name = 'ConnectionClosedError';
    this.code = `CLOSED_${cause.code}`;
  }
}

function closedConnection(err: unknown): err is Error & { code: string } {
  const code = (err as { code?: unknown } | null)?.code;
  return err instanceof Error && typeof code === 'string' && RESENT_BY_THE_SDK.includes(code);
}

/**
 * `inner` (the SDK's Node client by default) whose call is resent at most once after a closed
 * connection, within the call's timeout; `now` is a monotonic clock in ms (it runs on while a
 * process is frozen).
 */
export function noHiddenResends(
  inner: Stripe.HttpClient = Stripe.createNodeHttpClient(),
  now: () => number = () => performance.now(),
): Stripe.HttpClient {
  return {
    getClientName: () => inner.getClientName(),
    makeRequest: async (...args: Parameters<Stripe.HttpClient['makeRequest']>) => {
      const timeout = args[7];
      const started = now();
      try {
        return await inner.makeRequest(...args);
      } catch (err) {
        if (!closedConnection(err)) throw err;
        const left = Math.floor(timeout - (now() - started));
        if (left < RESEND_MIN_MS) throw new ConnectionClosedError(err);
        // The same request, its Idempotency-Key included: a first attempt that reached Stripe is
        // answered from it.
        const again = [...args] as Parameters<Stripe.HttpClient['makeRequest']>;
        again[7] = left;
        return inner.makeRequest(...again).catch((second: unknown) => {
          throw closedConnection(second) ? new ConnectionClosedError(second) : second;
        });
      }
    },
  };
}
