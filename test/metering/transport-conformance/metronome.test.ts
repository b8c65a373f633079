// Metronome's ingest (up to 100 events a call, a 400 resent event by event) through the transport
// conformance suite: the Metronome emulator and the SDK as production builds it.
import { startMetronomeEmulator } from '@meterbox/metronome-emulator';
import {
  createMetronomeClient,
  createMetronomeTransport,
  METRONOME_PAST_WINDOW_MS,
} from '../../../src/metering/metronome.js';
import { emulatorFaults, transportConformance } from './suite.js';

const TOKEN = 'metronome-conformance-token';

transportConformance('Metronome', async () => {
  const emulator = await startMetronomeEmulator({ tokens: [TOKEN] });
  const transport = (token: string) =>
    createMetronomeTransport(
      createMetronomeClient({ METRONOME_BEARER_TOKEN: token, METRONOME_API_BASE: emulator.url })!,
    );
  return {
    transport: () => transport(TOKEN),
    badCredentials: () => transport('not-the-token'),
    pastWindowMs: METRONOME_PAST_WINDOW_MS,
    validating: false,
    heldValue: (sent) => sent,
    ...emulatorFaults(emulator),
    held: () =>
      emulator.events().map((e) => ({
        identifier: e.transaction_id,
        customerId: e.customer_id,
        eventName: e.event_type,
        value: e.properties.value,
        timestamp: e.timestampMs / 1000,
      })),
    // Metronome validates every event before it answers: nothing is refused afterwards.
    refusedLater: () => [],
    calls: () => emulator.counters().calls.ingest,
    stop: () => emulator.stop(),
  };
});
