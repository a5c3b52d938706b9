/** Every fuzz target, in the order of the results table. */
import type { AnyTarget } from '../harness.js'
import { controlApi, controlApiLarge } from './control-api.js'
import { metadataCli, metadataImport } from './metadata-import.js'
import { nbdFrameReader } from './nbd-frame-reader.js'
import { nbdOptions } from './nbd-options.js'
import { nbdRequests } from './nbd-requests.js'
import { nbdServer } from './nbd-server.js'
import { peerClient } from './peer-client.js'
import { peerReply } from './peer-reply.js'

export const targets: AnyTarget[] = [
  nbdOptions,
  nbdFrameReader,
  nbdRequests,
  nbdServer,
  peerReply,
  peerClient,
  controlApi,
  controlApiLarge,
  metadataImport,
  metadataCli
]
