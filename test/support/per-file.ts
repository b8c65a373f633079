// Every test file's set-up (a set-up file runs once per file, also when files share a worker process):
// a failing test prints the run's seed, so its random draws can be replayed; whatever processes the
// file started are killed when it ends.
import { afterAll, beforeEach } from 'vitest';
import { killLeftoverProcesses } from './processes.js';
import { testSeed } from './random.js';

beforeEach(({ onTestFailed }) => {
  onTestFailed(() => {
    console.error(`[meterbox tests] random seed ${testSeed()}: rerun with MB_TEST_SEED=${testSeed()}`);
  });
});

afterAll(killLeftoverProcesses);
