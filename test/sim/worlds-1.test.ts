// The first half of the simulated worlds (test/sim/worlds.ts says what they check).
import { CHUNKS, worlds } from './worlds.js';

worlds(0, CHUNKS / 2);
