// For tests of code that talks to the emulator (`@meterbox/metronome-emulator/testing`): the real
// @metronome/sdk client pointed at one through its baseURL option, and a clock the test moves by hand.
import Metronome from '@metronome/sdk';
import type { MetronomeEmulator } from './server.js';

export const TEST_TOKEN = 'metronome-emulator-test-token';

export function sdk(
  emulator: Pick<MetronomeEmulator, 'url'>,
  options: { token?: string; timeout?: number; retries?: number } = {},
): Metronome {
  return new Metronome({
    bearerToken: options.token ?? TEST_TOKEN,
    baseURL: emulator.url,
    // The SDK retries 409, 429, 5xx and connection errors twice by default; tests see each answer.
    maxRetries: options.retries ?? 0,
    ...(options.timeout !== undefined ? { timeout: options.timeout } : {}),
  });
}

/** A clock the test moves by hand; starts at a fixed instant so the window edges are exact. */
export function manualClock(start = Date.UTC(2026, 10, 21, 10, 0, 0)) {
  let now = start;
  const clock = () => now;
  return Object.assign(clock, {
    set: (ms: number) => {
      now = ms;
    },
    advance: (ms: number) => {
      now += ms;
    },
  });
}
