// Waiting for a condition where vitest's vi.waitFor cannot run: the bench and `npm run simulate`
// run outside the test runner, and the harness they share with the chaos suite starts processes
// for both. Inside a test, use waitFor (test/support/wait.ts, on vi.waitFor).

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/**
 * Calls `check` every `everyMs` until it returns true; resolves true then, or false once `capMs`
 * has passed without it. A bench measures how long a condition takes, so running out is an
 * answer, not an error; `waitUntil` is the throwing form.
 */
export async function pollUntil(
  check: () => boolean | Promise<boolean>,
  capMs: number,
  everyMs = 200,
): Promise<boolean> {
  const started = Date.now();
  for (;;) {
    if (await check()) return true;
    if (Date.now() - started > capMs) return false;
    await sleep(everyMs);
  }
}

/** pollUntil that throws `timed out after … waiting for <what>` when the cap passes. */
export async function waitUntil(
  check: () => boolean | Promise<boolean>,
  capMs: number,
  what: string,
  everyMs = 200,
): Promise<void> {
  if (!(await pollUntil(check, capMs, everyMs)))
    throw new Error(`timed out after ${capMs} ms waiting for ${what}`);
}
