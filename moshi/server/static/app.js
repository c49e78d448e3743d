// The chat page: microphone -> Opus (WebCodecs) -> Ogg pages -> WebSocket, and back: Ogg pages -> Opus
// decoding -> jitter-buffered playback, with the live transcript. Messages carry their kind in byte 0.
import { OggReader, OggWriter, isOpusHeader } from './ogg.js';

const SAMPLE_RATE = 24000;
const PACKET_SAMPLES = 480; // 20 ms Opus packets
const PACKETS_PER_PAGE = 2; // one 40 ms page per message
const KIND = { handshake: 0, audio: 1, text: 2, control: 3, metadata: 4, error: 5, ping: 6, coloredText: 7 };

const $ = (id) => document.getElementById(id);

// Counters a test can read (window.moshiTest).
const test = {
  state: 'idle', handshake: false, textPieces: 0, audioMessages: 0, framesDecoded: 0, framesPlayed: 0,
  micFrames: 0, messagesSent: 0, errors: [],
};
window.moshiTest = test;

let conn = null;

function setStatus(text, cls) {
  $('status').textContent = text;
  $('status').className = `status ${cls}`;
  test.state = cls;
}

function showError(message) {
  test.errors.push(String(message));
  $('error').textContent = String(message);
  $('error').hidden = false;
}

function socketUrl() {
  const url = new URL('api/chat', window.location.href);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  url.search = window.location.search;
  return url.toString();
}

class Conversation {
  constructor() {
    this.micChunks = [];
    this.modelChunks = [];
    this.transcript = [];
    this.sentSamples = 0;
    this.playedSamples = 0;
    this.closed = false;
  }

  async start() {
    this.context = new AudioContext({ sampleRate: SAMPLE_RATE });
    await this.context.audioWorklet.addModule('capture-worklet.js');
    await this.context.audioWorklet.addModule('playback-worklet.js');
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: false, autoGainControl: false },
    });
    this.playback = new AudioWorkletNode(this.context, 'playback-processor', {
      outputChannelCount: [1],
      processorOptions: { startSamples: SAMPLE_RATE * 0.08, maxSamples: SAMPLE_RATE * 0.24 },
    });
    this.playback.port.onmessage = (e) => this.onPlayback(e.data);
    this.playback.connect(this.context.destination);
    this.setUpDecoder();
    this.ws = new WebSocket(socketUrl());
    this.ws.binaryType = 'arraybuffer';
    this.ws.onmessage = (e) => this.onMessage(new Uint8Array(e.data));
    this.ws.onclose = () => this.stop('connection closed');
    this.ws.onerror = () => showError('WebSocket error');
    setStatus('waiting for the server', 'waiting');
  }

  setUpDecoder() {
    this.oggIn = new OggReader();
    this.decodedTimestamp = 0;
    this.decoder = new AudioDecoder({
      output: (data) => {
        const raw = new Float32Array(data.numberOfFrames);
        data.copyTo(raw, { planeIndex: 0, format: 'f32-planar' });
        const pcm = resample(raw, data.sampleRate, SAMPLE_RATE);
        data.close();
        test.framesDecoded += pcm.length / 1920;
        this.modelChunks.push(pcm);
        this.playback.port.postMessage(pcm);
      },
      error: (e) => showError(`decoder: ${e.message}`),
    });
    this.decoder.configure({ codec: 'opus', sampleRate: SAMPLE_RATE, numberOfChannels: 1 });
  }

  async startMicrophone() {
    this.oggOut = new OggWriter(SAMPLE_RATE);
    this.pendingPackets = [];
    this.encoder = new AudioEncoder({
      output: (chunk) => this.onPacket(chunk),
      error: (e) => showError(`encoder: ${e.message}`),
    });
    this.encoder.configure({
      codec: 'opus', sampleRate: SAMPLE_RATE, numberOfChannels: 1, bitrate: 32000,
      opus: { frameDuration: (PACKET_SAMPLES / SAMPLE_RATE) * 1e6 },
    });
    for (const page of this.oggOut.headers()) this.send(KIND.audio, page);
    this.capture = new AudioWorkletNode(this.context, 'capture-processor', {
      processorOptions: { blockSize: 1920 },
    });
    this.capture.port.onmessage = (e) => this.onMicBlock(e.data);
    this.source = this.context.createMediaStreamSource(this.stream);
    this.source.connect(this.capture);
    this.captureTimestamp = 0;
  }

  onMicBlock(block) {
    if (this.closed || this.encoder.state !== 'configured') return;
    test.micFrames += 1;
    this.micChunks.push(block);
    const data = new AudioData({
      format: 'f32-planar', sampleRate: SAMPLE_RATE, numberOfFrames: block.length, numberOfChannels: 1,
      timestamp: this.captureTimestamp, data: block,
    });
    this.captureTimestamp += (block.length / SAMPLE_RATE) * 1e6;
    this.encoder.encode(data);
    data.close();
  }

  onPacket(chunk) {
    const packet = new Uint8Array(chunk.byteLength);
    chunk.copyTo(packet);
    this.pendingPackets.push(packet);
    if (this.pendingPackets.length === PACKETS_PER_PAGE) {
      this.send(KIND.audio, this.oggOut.dataPage(this.pendingPackets, PACKET_SAMPLES));
      this.sentSamples += PACKET_SAMPLES * PACKETS_PER_PAGE;
      this.pendingPackets = [];
    }
  }

  send(kind, payload) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
    const message = new Uint8Array(payload.length + 1);
    message[0] = kind;
    message.set(payload, 1);
    this.ws.send(message);
    test.messagesSent += 1;
  }

  onMessage(message) {
    const kind = message[0];
    const payload = message.subarray(1);
    if (kind === KIND.handshake) {
      test.handshake = true;
      setStatus('connected', 'live');
      this.startMicrophone().catch((e) => showError(e));
    } else if (kind === KIND.audio) {
      test.audioMessages += 1;
      let packets;
      try { packets = this.oggIn.push(payload); } catch (e) { showError(e); return; }
      for (const packet of packets) {
        if (isOpusHeader(packet)) continue;
        this.decoder.decode(new EncodedAudioChunk({ type: 'key', timestamp: this.decodedTimestamp, data: packet }));
        this.decodedTimestamp += 20000;
      }
    } else if (kind === KIND.text || kind === KIND.coloredText) {
      const text = new TextDecoder().decode(kind === KIND.text ? payload : payload.subarray(1));
      this.addText(text);
    } else if (kind === KIND.error) {
      showError(`server: ${new TextDecoder().decode(payload)}`);
    }
    // Other kinds (metadata, ping) carry nothing this page shows.
  }

  addText(text) {
    test.textPieces += 1;
    this.transcript.push(text);
    const span = document.createElement('span');
    span.textContent = text;
    $('transcript').appendChild(span);
  }

  onPlayback(report) {
    this.playedSamples = report.played;
    test.framesPlayed = report.played / 1920;
    const latency = Math.max(0, this.sentSamples - this.playedSamples) / SAMPLE_RATE;
    this.latency = this.latency === undefined ? latency : 0.85 * this.latency + 0.15 * latency;
    test.latencyMs = Math.round(this.latency * 1000);
    $('latency').textContent = `${test.latencyMs} ms`;
    $('sent').textContent = `${(this.sentSamples / SAMPLE_RATE).toFixed(1)} s`;
    $('played').textContent = `${(report.played / SAMPLE_RATE).toFixed(1)} s`;
    $('buffer').textContent = `${Math.round((report.queued / SAMPLE_RATE) * 1000)} ms`;
  }

  stop(reason) {
    if (this.closed) return;
    this.closed = true;
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close();
    if (this.source) this.source.disconnect();
    if (this.stream) for (const track of this.stream.getTracks()) track.stop();
    if (this.encoder && this.encoder.state !== 'closed') this.encoder.close();
    if (this.decoder && this.decoder.state !== 'closed') this.decoder.close();
    if (this.context) this.context.close();
    if (test.state !== 'failed') setStatus(`disconnected (${reason})`, 'idle');
    $('connect').disabled = false;
    $('disconnect').disabled = true;
    $('download-audio').disabled = this.modelChunks.length === 0 && this.micChunks.length === 0;
    $('download-text').disabled = this.transcript.length === 0;
  }
}

// Linear-interpolation resampling (the Opus decoder may output 48 kHz whatever rate it was given).
function resample(x, from, to) {
  if (from === to) return x;
  const n = Math.round((x.length * to) / from);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const t = (i * from) / to;
    const j = Math.floor(t);
    const f = t - j;
    out[i] = (x[j] || 0) * (1 - f) + (x[Math.min(j + 1, x.length - 1)] || 0) * f;
  }
  return out;
}

function wav(left, right) {
  // 16-bit stereo WAV: the model on the left, the microphone on the right.
  const n = Math.max(left.length, right.length);
  const buffer = new ArrayBuffer(44 + n * 4);
  const v = new DataView(buffer);
  const ascii = (off, s) => { for (let i = 0; i < s.length; i++) v.setUint8(off + i, s.charCodeAt(i)); };
  ascii(0, 'RIFF'); v.setUint32(4, 36 + n * 4, true); ascii(8, 'WAVE'); ascii(12, 'fmt ');
  v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 2, true);
  v.setUint32(24, SAMPLE_RATE, true); v.setUint32(28, SAMPLE_RATE * 4, true);
  v.setUint16(32, 4, true); v.setUint16(34, 16, true); ascii(36, 'data'); v.setUint32(40, n * 4, true);
  const clip = (x) => Math.max(-1, Math.min(1, x || 0)) * 0x7fff;
  for (let i = 0; i < n; i++) {
    v.setInt16(44 + i * 4, clip(left[i]), true);
    v.setInt16(46 + i * 4, clip(right[i]), true);
  }
  return new Blob([buffer], { type: 'audio/wav' });
}

function flat(chunks) {
  const out = new Float32Array(chunks.reduce((n, c) => n + c.length, 0));
  let pos = 0;
  for (const c of chunks) { out.set(c, pos); pos += c.length; }
  return out;
}

function download(blob, name) {
  const a = document.createElement('a');
  a.href = URL.createObjectURL(blob);
  a.download = name;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

$('connect').onclick = async () => {
  $('connect').disabled = true;
  $('disconnect').disabled = false;
  $('error').hidden = true;
  $('transcript').textContent = '';
  conn = new Conversation();
  try {
    await conn.start();
  } catch (e) {
    showError(e);
    setStatus('failed', 'failed');
    conn.stop('failed to start');
  }
};

$('disconnect').onclick = () => conn && conn.stop('by you');
$('download-audio').onclick = () => conn && download(wav(flat(conn.modelChunks), flat(conn.micChunks)), 'conversation.wav');
$('download-text').onclick = () => conn && download(new Blob([conn.transcript.join('')], { type: 'text/plain' }), 'transcript.txt');
