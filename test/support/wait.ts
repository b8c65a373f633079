// The testkit's one way to wait for a condition: vi.waitFor, which retries until the callback stops
// throwing. `check` returns the awaited value, or something falsy while it is not there yet.
// Code that also runs outside vitest (the bench, the harness it shares with chaos) uses poll.ts.
import { vi } from 'vitest';

export async function waitFor<T>(
  what: string,
  check: () => Promise<T> | T,
  timeoutMs = 20_000,
  intervalMs = 25,
): Promise<NonNullable<T>> {
  return vi.waitFor(
    async () => {
      const value = await check();
      if (!value) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
      return value as NonNullable<T>;
    },
    { timeout: timeoutMs, interval: intervalMs },
  );
}
