// Test helpers for the emulator: the real @metronome/sdk client pointed at it and a controllable
// clock (src/testing.ts), per-file fixtures, and small builders. The package's own: it must not reach
// into meterbox's test kit.
import type Metronome from '@metronome/sdk';
import { APIError } from '@metronome/sdk';
import { test } from 'vitest';
import {
  type MetronomeEmulator,
  type MetronomeEmulatorOptions,
  startMetronomeEmulator,
} from '../src/index.js';
import { type manualClock, sdk } from '../src/testing.js';

export { manualClock, sdk, TEST_TOKEN } from '../src/testing.js';

export const HOUR = 3_600_000;
export const DAY = 24 * HOUR;

/** Runs `fn` and returns the error it rejects with (fails the test if it resolves). */
export async function rejection(fn: () => Promise<unknown>): Promise<Error> {
  try {
    await fn();
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected the call to fail');
}

/** The SDK's APIError of a failed call (fails the test for any other outcome). */
export async function apiError(fn: () => Promise<unknown>): Promise<APIError> {
  const err = await rejection(fn);
  if (!(err instanceof APIError)) throw new Error(`expected an APIError, got ${String(err)}`);
  return err;
}

export interface UsageEvent {
  transaction_id: string;
  customer_id: string;
  event_type: string;
  timestamp: string;
  properties?: Record<string, unknown>;
}

const iso = (ms: number) => new Date(ms).toISOString();

/** A temperature_readings event as meterbox sends it: `value` readings stored, as a string. */
export const reading = (id: string, customer: string, at: number, value = 1): UsageEvent => ({
  transaction_id: id,
  customer_id: customer,
  event_type: 'temperature_readings',
  timestamp: iso(at),
  properties: { value: String(value) },
});

export const activeSensors = (id: string, customer: string, at: number, value: number): UsageEvent => ({
  transaction_id: id,
  customer_id: customer,
  event_type: 'active_sensors',
  timestamp: iso(at),
  properties: { value: String(value) },
});

/**
 * A `test` (use it as `it`) whose fixtures are the file's emulator driven by `clock` (`emu`) and
 * the real SDK pointed at it (`metronome`): started on first use, stopped after the file even when
 * a test fails; every test starts on an emulator reset to its starting customers and metrics, with
 * the clock moved back to `resetAt` when given.
 */
export function emulatorTest(
  clock: ReturnType<typeof manualClock>,
  resetAt?: number,
  options: Omit<MetronomeEmulatorOptions, 'clock'> = {},
) {
  return (
    test
      // biome-ignore lint/correctness/noEmptyPattern: vitest reads a fixture's dependencies from this pattern
      .extend('emu', { scope: 'file' }, async ({}, { onCleanup }): Promise<MetronomeEmulator> => {
        const emu = await startMetronomeEmulator({ ...options, clock });
        onCleanup(() => emu.stop());
        return emu;
      })
      .extend('metronome', { scope: 'file' }, async ({ emu }): Promise<Metronome> => sdk(emu))
      .extend('fresh', { auto: true }, async ({ emu }) => {
        emu.reset({ customers: true, billableMetrics: true });
        emu.setFaults({});
        emu.setClockOffset(0);
        if (resetAt !== undefined) clock.set(resetAt);
      })
  );
}
