// Plays the model's audio through a small jitter buffer. Playback starts once `startSamples` are queued;
// above `maxSamples` the oldest audio is dropped (latency stays bounded); on underrun it plays silence and
// waits for `startSamples` again. Reports the samples played to the page.
class PlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions;
    this.startSamples = o.startSamples;
    this.maxSamples = o.maxSamples;
    this.chunks = [];
    this.queued = 0;
    this.offset = 0; // read position in chunks[0]
    this.playing = false;
    this.played = 0;
    this.dropped = 0;
    this.underruns = 0;
    this.sinceReport = 0;
    this.port.onmessage = (e) => {
      this.chunks.push(e.data);
      this.queued += e.data.length;
      while (this.queued - this.chunks[0].length + this.offset > this.maxSamples) {
        const first = this.chunks.shift();
        this.queued -= first.length - this.offset;
        this.dropped += first.length - this.offset;
        this.offset = 0;
      }
    };
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && this.queued >= this.startSamples) this.playing = true;
    let i = 0;
    if (this.playing) {
      while (i < out.length && this.chunks.length) {
        const chunk = this.chunks[0];
        const n = Math.min(out.length - i, chunk.length - this.offset);
        out.set(chunk.subarray(this.offset, this.offset + n), i);
        i += n;
        this.offset += n;
        this.queued -= n;
        if (this.offset === chunk.length) { this.chunks.shift(); this.offset = 0; }
      }
      this.played += i;
      if (i < out.length) { this.playing = false; this.underruns += 1; }
    }
    out.fill(0, i);
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    this.sinceReport += out.length;
    if (this.sinceReport >= sampleRate / 10) {
      this.sinceReport = 0;
      this.port.postMessage({ played: this.played, queued: this.queued, dropped: this.dropped, underruns: this.underruns });
    }
    return true;
  }
}

registerProcessor('playback-processor', PlaybackProcessor);
