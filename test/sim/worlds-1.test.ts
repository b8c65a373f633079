// Half the simulated worlds (test/sim/worlds.ts says what they check): every other chunk.
import { worlds } from './worlds.js';

worlds(0, 2);
