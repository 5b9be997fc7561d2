// Score 8-bit PNG images with a model exported by `mahalanobisad.py --export` (docs/deploying.md).
//   npm install --ignore-scripts        (once, in this folder)
//   node score.js MODEL.onnx IMAGE.png [IMAGE.png ...]
// Prints one JSON line per image: {"path", "score", "anomaly", "map_max"}. Each image must have the
// size the model was exported for; everything else (resize, crop, backbone, scoring) is in the model.
const fs = require('fs');
const ort = require('onnxruntime-node');
const { PNG } = require('pngjs');

function rgbTensor(path) {
  const png = PNG.sync.read(fs.readFileSync(path));  // RGBA, 8 bits per channel
  const rgb = new Uint8Array(png.width * png.height * 3);
  for (let i = 0, j = 0; i < png.data.length; i += 4, j += 3) {
    rgb[j] = png.data[i];
    rgb[j + 1] = png.data[i + 1];
    rgb[j + 2] = png.data[i + 2];
  }
  return new ort.Tensor('uint8', rgb, [1, png.height, png.width, 3]);  // (N, H, W, 3) RGB
}

async function main() {
  const [modelPath, ...images] = process.argv.slice(2);
  if (!modelPath || images.length === 0) {
    console.error('usage: node score.js MODEL.onnx IMAGE.png [IMAGE.png ...]');
    process.exit(2);
  }
  const session = await ort.InferenceSession.create(modelPath);
  for (const path of images) {
    const out = await session.run({ image: rgbTensor(path) });
    const map = out.anomaly_map ? out.anomaly_map.data : null;
    console.log(JSON.stringify({
      path,
      score: out.score.data[0],
      anomaly: Boolean(out.anomaly.data[0]),
      map_max: map ? map.reduce((a, b) => Math.max(a, b), -Infinity) : null,
    }));
  }
}

main().catch((e) => {
  console.error(`score.js: error: ${String(e.message || e).split('\n')[0]}`);
  process.exit(1);
});
