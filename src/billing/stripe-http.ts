// The Stripe SDK's HTTP client, without the one resend the SDK makes on its own. Stripe's SDK resends
// a call once when its connection closed without an answer (ECONNRESET, EPIPE), whatever
// maxNetworkRetries says (RequestSender._shouldRetry: "a closed connection is retried once even when
// retries are disabled"). meterbox owns its retries: a delivery call goes out only under its key's
// lease and ends before the lease does (src/metering/calls.ts), and a resend the worker never sees
// breaks both. A worker frozen past its lease, whose idle connection the server closed meanwhile,
// wakes to the closed connection and resent the call a second later, while the key's next owner had
// its own call in flight (test/e2e/frozen-workers.test.ts); and a resend gets a whole timeout of its
// own, so a call could outlive its lease. Here a closed connection is an answer like any other
// connection error: the call's outcome is `network`, and delivery resends the same identifier later,
// under a lease, counted.
import Stripe from 'stripe';

/** The error codes the SDK resends on its own (HttpClient.CONNECTION_CLOSED_ERROR_CODES). */
const RESENT_BY_THE_SDK: readonly string[] = Stripe.HttpClient.CONNECTION_CLOSED_ERROR_CODES;

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

/** `inner` (the SDK's Node client by default) whose closed connections the SDK will not resend. */
export function noHiddenResends(inner: Stripe.HttpClient = Stripe.createNodeHttpClient()): Stripe.HttpClient {
  return {
    getClientName: () => inner.getClientName(),
    makeRequest: (...args: Parameters<Stripe.HttpClient['makeRequest']>) =>
      inner.makeRequest(...args).catch((err: unknown) => {
        throw closedConnection(err) ? new ConnectionClosedError(err) : err;
      }),
  };
}
