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

export { manualClock } from '@meterbox/emulator-kit';
