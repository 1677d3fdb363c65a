import Foundation
import MBQFormats
import MBQModel
import MBQTensor

/// Caption cross-entropy / perplexity of a model on a bundle, its teacher-forced greedy
/// accuracy over caption tokens and, given a reference model, the mean KL(reference ||
/// model) of the next-token distributions over every next-token position and over
/// caption positions.
public struct EvalResult: Sendable {
    public var captionCE: Double
    public var captionTokens: Int
    /// Caption tokens whose label is the model's most likely next token given the true
    /// prefix (teacher-forced greedy; a tie goes to the lowest token id, as torch.argmax).
    public var captionCorrect: Int
    public var klAll: Double?
    public var klCaption: Double?
    public var positions: Int
    public var captionPPL: Double { exp(captionCE) }
    public var captionAccuracy: Double { Double(captionCorrect) / Double(max(captionTokens, 1)) }

    public var json: [String: Any] {
        var o: [String: Any] = ["caption_ce": captionCE, "caption_ppl": captionPPL, "caption_tokens": captionTokens,
                                "caption_accuracy": captionAccuracy, "caption_correct": captionCorrect, "positions": positions]
        o["kl_all"] = klAll ?? NSNull()
        o["kl_caption"] = klCaption ?? NSNull()
        return o
    }
}

public enum Evaluate {
    /// `actBits`/`referenceActBits`: per-token activation quantization of W-A checkpoints.
    /// The decoder blocks run through `backend` (`GradientPass.forward`, the arithmetic of
    /// every other pass); the head's log-probabilities on the host.
    public static func run(model: LanguageModel<Float>, actBits: Int?, samples: [CalibrationSample],
                           reference: LanguageModel<Float>? = nil, referenceActBits: Int? = nil,
                           backend: ComputeBackend = CPUBackend()) throws -> EvalResult {
        var ce = 0.0, capTokens = 0, correct = 0, klAll = 0.0, klCap = 0.0, positions = 0
        let blocks = try model.blocks.map { try backend.loadBlock($0) }
        let referenceBlocks = try reference.map { r in try r.blocks.map { try backend.loadBlock($0) } }
        func hidden(_ m: LanguageModel<Float>, _ blocks: [BackendBlock], _ s: CalibrationSample, actBits: Int?) throws -> Tensor<Float> {
            try backend.download(try GradientPass.modelForward(s, model: m, blocks: blocks, backend: backend, actBits: actBits))
        }
        for s in samples {
            let t = s.length
            // Next-token positions: t predicts t+1, both real tokens.
            let rows = (0..<max(0, t - 1)).filter { s.attention[$0] && s.attention[$0 + 1] }
            guard !rows.isEmpty else { continue }
            let h = try hidden(model, blocks, s, actBits: actBits)
            let lp = logProbabilities(h, rows: rows, norm: model.finalNorm, lmHead: model.lmHead, eps: Float(model.config.rmsNormEps))
            var refLP: Tensor<Float>? = nil
            if let reference, let referenceBlocks {
                let hr = try hidden(reference, referenceBlocks, s, actBits: referenceActBits)
                refLP = logProbabilities(hr, rows: rows, norm: reference.finalNorm, lmHead: reference.lmHead,
                                         eps: Float(reference.config.rmsNormEps))
            }
            let vocab = lp.cols
            for (r, pos) in rows.enumerated() {
                let label = s.labels[pos + 1]
                let isCaption = label != -100
                if isCaption {
                    ce -= Double(lp.data[r * vocab + label])
                    capTokens += 1
                    if argmax(lp.data, row: r, cols: vocab) == label { correct += 1 }
                }
                if let refLP {
                    var kl = 0.0
                    for j in 0..<vocab {
                        let lr = Double(refLP.data[r * vocab + j])
                        kl += exp(lr) * (lr - Double(lp.data[r * vocab + j]))
                    }
                    klAll += kl
                    if isCaption { klCap += kl }
                }
                positions += 1
            }
        }
        guard capTokens > 0 else { throw MethodsError.noUsableSamples("no caption token is predicted in the bundle") }
        return EvalResult(captionCE: ce / Double(capTokens), captionTokens: capTokens, captionCorrect: correct,
                          klAll: reference == nil ? nil : klAll / Double(max(positions, 1)),
                          klCaption: reference == nil ? nil : klCap / Double(capTokens), positions: positions)
    }

    /// The first index of the largest value in row `row` of a [rows, cols] buffer.
    static func argmax(_ data: [Float], row: Int, cols: Int) -> Int {
        var best = 0, bestValue = data[row * cols]
        for j in 1..<cols where data[row * cols + j] > bestValue {
            best = j; bestValue = data[row * cols + j]
        }
        return best
    }
}
