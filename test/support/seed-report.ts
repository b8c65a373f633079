// Every test file's set-up: a failing test prints the run's seed, so its random draws can be replayed.
import { beforeEach } from 'vitest';
import { testSeed } from './random.js';

beforeEach(({ onTestFailed }) => {
  onTestFailed(() => {
    console.error(`[meterbox tests] random seed ${testSeed()}: rerun with MB_TEST_SEED=${testSeed()}`);
  });
});
