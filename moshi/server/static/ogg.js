// Ogg pages for an Opus stream: a writer (one page per group of packets) and a reader that returns the
// packets of whatever bytes arrive, across message and page boundaries. Only what Opus over Ogg needs.

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let r = i << 24;
    for (let j = 0; j < 8; j++) r = r & 0x80000000 ? (r << 1) ^ 0x04c11db7 : r << 1;
    table[i] = r >>> 0;
  }
  return table;
})();

function crc32(bytes) {
  let crc = 0;
  for (let i = 0; i < bytes.length; i++) crc = ((crc << 8) ^ CRC_TABLE[((crc >>> 24) ^ bytes[i]) & 0xff]) >>> 0;
  return crc >>> 0;
}

function concat(chunks) {
  const total = chunks.reduce((n, c) => n + c.length, 0);
  const out = new Uint8Array(total);
  let pos = 0;
  for (const c of chunks) { out.set(c, pos); pos += c.length; }
  return out;
}

export class OggWriter {
  // Opus at `sampleRate` Hz, one channel; granule positions count 48 kHz samples, as Ogg Opus defines.
  constructor(sampleRate, serial = 0x6d6f7368) {
    this.sampleRate = sampleRate;
    this.serial = serial;
    this.sequence = 0;
    this.granule = 0;
  }

  page(packets, headerType, granule) {
    const lacing = [];
    for (const p of packets) {
      let n = p.length;
      while (n >= 255) { lacing.push(255); n -= 255; }
      lacing.push(n);
    }
    if (lacing.length > 255) throw new Error('too many packets for one Ogg page');
    const body = concat(packets);
    const page = new Uint8Array(27 + lacing.length + body.length);
    const view = new DataView(page.buffer);
    page.set([0x4f, 0x67, 0x67, 0x53], 0); // "OggS"
    page[4] = 0;
    page[5] = headerType;
    view.setUint32(6, granule % 0x100000000, true);
    view.setUint32(10, Math.floor(granule / 0x100000000), true);
    view.setUint32(14, this.serial, true);
    view.setUint32(18, this.sequence++, true);
    page[26] = lacing.length;
    page.set(lacing, 27);
    page.set(body, 27 + lacing.length);
    view.setUint32(22, crc32(page), true);
    return page;
  }

  // The two header pages: OpusHead (first page of the stream) and OpusTags.
  headers() {
    const head = new Uint8Array(19);
    const hv = new DataView(head.buffer);
    head.set(new TextEncoder().encode('OpusHead'), 0);
    head[8] = 1; // version
    head[9] = 1; // channels
    hv.setUint16(10, 312, true); // pre-skip (48 kHz samples)
    hv.setUint32(12, this.sampleRate, true);
    hv.setInt16(16, 0, true);
    head[18] = 0; // mapping family
    const vendor = new TextEncoder().encode('moshi-finetune');
    const tags = new Uint8Array(8 + 4 + vendor.length + 4);
    const tv = new DataView(tags.buffer);
    tags.set(new TextEncoder().encode('OpusTags'), 0);
    tv.setUint32(8, vendor.length, true);
    tags.set(vendor, 12);
    tv.setUint32(12 + vendor.length, 0, true);
    return [this.page([head], 0x02, 0), this.page([tags], 0x00, 0)];
  }

  // One page holding `packets`, each `samplesPerPacket` samples long at the stream's rate.
  dataPage(packets, samplesPerPacket) {
    this.granule += packets.length * samplesPerPacket * (48000 / this.sampleRate);
    return this.page(packets, 0x00, this.granule);
  }
}

export class OggReader {
  constructor() {
    this.buffer = new Uint8Array(0);
    this.partial = []; // segments of a packet continued on the next page
  }

  // Appends bytes; returns the complete packets they finish. Throws on bytes that are not Ogg pages.
  push(bytes) {
    this.buffer = concat([this.buffer, bytes]);
    const packets = [];
    let pos = 0;
    while (this.buffer.length - pos >= 27) {
      const b = this.buffer;
      if (b[pos] !== 0x4f || b[pos + 1] !== 0x67 || b[pos + 2] !== 0x67 || b[pos + 3] !== 0x53) {
        throw new Error('not an Ogg page');
      }
      const nSeg = b[pos + 26];
      if (this.buffer.length - pos < 27 + nSeg) break;
      const lacing = b.subarray(pos + 27, pos + 27 + nSeg);
      const bodyLen = lacing.reduce((n, x) => n + x, 0);
      const end = pos + 27 + nSeg + bodyLen;
      if (end > this.buffer.length) break;
      let off = pos + 27 + nSeg;
      for (const len of lacing) {
        this.partial.push(b.slice(off, off + len));
        off += len;
        if (len < 255) { packets.push(concat(this.partial)); this.partial = []; }
      }
      pos = end;
    }
    this.buffer = this.buffer.slice(pos);
    return packets;
  }
}

export function isOpusHeader(packet) {
  if (packet.length < 8) return false;
  const magic = new TextDecoder().decode(packet.subarray(0, 8));
  return magic === 'OpusHead' || magic === 'OpusTags';
}
