// The second half of the simulated worlds (test/sim/worlds.ts says what they check).
import { CHUNKS, worlds } from './worlds.js';

worlds(CHUNKS / 2, CHUNKS);
