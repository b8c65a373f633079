// The other half of the simulated worlds (test/sim/worlds.ts says what they check).
import { worlds } from './worlds.js';

worlds(1, 2);
