import Foundation
import MBQFormats
import MBQTensor
import XCTest

final class SafetensorsTests: XCTestCase {
    func testRoundTripEveryWritableDType() throws {
        let dir = TempDir()
        let f = Tensor<Float>(shape: [2, 3], data: [1, -2.5, 3.25, 0, 1e-3, -7])
        var w = SafetensorsWriter()
        w.add("f32", f, as: .f32)
        w.add("bf16", f, as: .bf16)
        w.add("f16", f, as: .f16)
        w.add("i64", int64: [-100, 0, 1 << 40], shape: [3])
        w.add("i32", int32: [-5, 7], shape: [2])
        w.add("i8", int8: [-128, 127], shape: [2])
        w.add("u8", uint8: [0, 255, 3], shape: [3, 1])
        w.add("empty", floats: [], shape: [0, 4])
        try w.write(to: dir.file("a.safetensors"), metadata: ["format": "pt", "note": "x"])
        let r = try SafetensorsFile(path: dir.file("a.safetensors"))
        XCTAssertEqual(r.metadata, ["format": "pt", "note": "x"])
        XCTAssertEqual(try r.floatTensor("f32").data, f.data)
        XCTAssertEqual(try r.floatTensor("bf16").data, f.data.map { HalfPrecision.bf16ToFloat(HalfPrecision.floatToBF16($0)) })
        XCTAssertEqual(try r.floatTensor("f16").data, f.data.map { HalfPrecision.fp16ToFloat(HalfPrecision.floatToFP16($0)) })
        XCTAssertEqual(try r.intValues("i64").values, [-100, 0, 1 << 40])
        XCTAssertEqual(try r.intValues("i32").values, [-5, 7])
        XCTAssertEqual(try r.intValues("i8").values, [-128, 127])
        XCTAssertEqual(try r.intValues("u8").shape, [3, 1])
        XCTAssertEqual(try r.intValues("u8").values, [0, 255, 3])
        XCTAssertEqual(try r.floatTensor("empty").shape, [0, 4])
        XCTAssertEqual(try r.entry("bf16").dtype, .bf16)
        // Data section starts 8-byte aligned.
        XCTAssertEqual((try r.entry("f32").byteRange.lowerBound - 8) % 8, 0)
    }

    /// Tensors copied from another file's mapping come out byte for byte as if their
    /// bytes had been added: the same file, written or serialized.
    func testCopyingFromAMappedFile() throws {
        let dir = TempDir()
        var src = SafetensorsWriter()
        src.add("b", Tensor<Float>(shape: [3, 2], data: [1, 2, 3, 4, 5, 6]), as: .bf16)
        src.add("a", uint8: [9, 8, 7], shape: [3])
        src.add("empty", floats: [], shape: [0, 2])
        try src.write(to: dir.file("src.safetensors"))
        let source = try SafetensorsFile(path: dir.file("src.safetensors"))
        var copied = SafetensorsWriter(), held = SafetensorsWriter()
        for name in ["b", "a", "empty"] {
            try copied.add(copying: name, from: source)
            let e = try source.entry(name)
            held.add(name, dtype: e.dtype, shape: e.shape, bytes: Array(try source.rawBytes(name)))
        }
        copied.add("new", floats: [0.5], shape: [1])
        held.add("new", floats: [0.5], shape: [1])
        XCTAssertEqual(try copied.serialized(metadata: ["format": "pt"]), try held.serialized(metadata: ["format": "pt"]))
        try copied.write(to: dir.file("out.safetensors"), metadata: ["format": "pt"])
        let written = try Data(contentsOf: URL(fileURLWithPath: dir.file("out.safetensors")))
        XCTAssertEqual(Array(written), try held.serialized(metadata: ["format": "pt"]))
        XCTAssertEqual(try SafetensorsFile(path: dir.file("out.safetensors")).floatTensor("b").data, [1, 2, 3, 4, 5, 6])
    }

    func testAtomicWriteLeavesNoPartialFile() throws {
        let dir = TempDir()
        var w = SafetensorsWriter()
        w.add("x", floats: [1, 2], shape: [2])
        XCTAssertThrowsError(try w.write(to: dir.file("missing-dir/out.safetensors"))) { e in
            XCTAssert("\(e)".contains("missing-dir/out.safetensors"), "\(e)")
        }
        try w.write(to: dir.file("out.safetensors"))
        let listing = try FileManager.default.contentsOfDirectory(atPath: dir.path)
        XCTAssertEqual(listing, ["out.safetensors"], "no temp files left behind")
    }

    /// Every malformed file gets a FormatsError whose message names the file (and the tensor).
    func testMalformedFilesAreRejectedWithClearErrors() throws {
        let dir = TempDir()
        let four = [UInt8](repeating: 0, count: 4)
        let cases: [(String, String, [UInt8], UInt64?, [String])] = [
            ("empty-header", "", [], nil, ["not valid JSON"]),
            ("lying-length", "{}", [], 4096, ["header claims 4096"]),
            ("huge-length", "{}", [], UInt64(1) << 40, ["exceeds"]),
            ("not-json", "{nope", [], nil, ["not valid JSON"]),
            ("array", "[1,2]", [], nil, ["not a JSON object"]),
            ("bad-dtype", #"{"w":{"dtype":"Q4","shape":[1],"data_offsets":[0,4]}}"#, four, nil, ["'w'", "unknown dtype 'Q4'"]),
            ("no-dtype", #"{"w":{"shape":[1],"data_offsets":[0,4]}}"#, four, nil, ["'w'", "missing dtype"]),
            ("size-mismatch", #"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, four, nil, ["'w'", "needs 8 bytes"]),
            ("past-end", #"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, four, nil, ["'w'", "past the data section"]),
            ("backwards", #"{"w":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}}"#, four, nil, ["'w'", "backwards"]),
            ("negative-shape", #"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#, four, nil, ["'w'", "shape"]),
            ("fractional-shape", #"{"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}}"#, four, nil, ["'w'", "shape"]),
            ("overlap", #"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#,
             four, nil, ["'a'", "'b'", "overlap"]),
            ("bad-metadata", #"{"__metadata__":{"k":1}}"#, [], nil, ["__metadata__"]),
        ]
        for (name, header, data, claimed, needles) in cases {
            let path = dir.rawSafetensors(name + ".safetensors", header: header, data: data, claimedLength: claimed)
            XCTAssertThrowsError(try SafetensorsFile(path: path), name) { e in
                let msg = "\(e)"
                XCTAssert(e is FormatsError, "\(name): \(type(of: e))")
                XCTAssert(msg.contains(name + ".safetensors"), "\(name): message does not name the file: \(msg)")
                for n in needles { XCTAssert(msg.contains(n), "\(name): '\(n)' not in: \(msg)") }
            }
        }
    }

    func testMissingFileAndMissingTensor() throws {
        let dir = TempDir()
        XCTAssertThrowsError(try SafetensorsFile(path: dir.file("nope.safetensors"))) { e in
            XCTAssert("\(e)".contains("nope.safetensors"))
        }
        FileManager.default.createFile(atPath: dir.file("short.safetensors"), contents: Data([1, 2, 3]))
        XCTAssertThrowsError(try SafetensorsFile(path: dir.file("short.safetensors"))) { e in
            XCTAssert("\(e)".contains("short.safetensors") && "\(e)".contains("shorter than the 8-byte"), "\(e)")
        }
        var w = SafetensorsWriter()
        w.add("a", floats: [1], shape: [1])
        try w.write(to: dir.file("t.safetensors"))
        let f = try SafetensorsFile(path: dir.file("t.safetensors"))
        XCTAssertThrowsError(try f.floatTensor("b")) { e in
            XCTAssertEqual(e as? FormatsError, .missingTensor(name: "b", in: dir.file("t.safetensors")))
        }
        XCTAssertThrowsError(try f.intValues("a")) { e in XCTAssert("\(e)".contains("'a'")) }
    }

    /// A file cut short after writing (e.g. a copy interrupted) is detected from the header.
    func testTruncatedDataSection() throws {
        let dir = TempDir()
        var w = SafetensorsWriter()
        w.add("big", floats: [Float](repeating: 1, count: 1000), shape: [1000])
        try w.write(to: dir.file("t.safetensors"))
        let data = try Data(contentsOf: URL(fileURLWithPath: dir.file("t.safetensors")))
        try data.prefix(data.count - 100).write(to: URL(fileURLWithPath: dir.file("cut.safetensors")))
        XCTAssertThrowsError(try SafetensorsFile(path: dir.file("cut.safetensors"))) { e in
            XCTAssert("\(e)".contains("'big'") && "\(e)".contains("past the data section"), "\(e)")
        }
    }
}
