import Foundation
import MBQFormats
import XCTest

/// config.json is edited as text: a float stays a float, keys stay where they were.
final class ConfigEditTests: XCTestCase {
    let block: JSONText = .object([("quant_method", "awq"), ("bits", 4), ("scale", .double(1.0)),
                                   ("ignore", .array(["lm_head", "re:.*visual.*"])), ("empty", .object([])), ("none", .null)])

    func testEveryInputByteStaysAndTheKeyIsAddedLast() throws {
        let text = "{\n  \"architectures\": [\n    \"LlavaForConditionalGeneration\"\n  ],\n  \"vision_config\": {\n    \"initializer_factor\": 1.0,\n    \"hidden_size\": 32\n  },\n  \"z_first\": 2.50,\n  \"a_last\": 1e-06\n}\n"
        let edited = try ConfigEdit.addingTopLevelKey("quantization_config", value: block, to: text, path: "config.json")
        XCTAssertEqual(edited, """
        {
          "architectures": [
            "LlavaForConditionalGeneration"
          ],
          "vision_config": {
            "initializer_factor": 1.0,
            "hidden_size": 32
          },
          "z_first": 2.50,
          "a_last": 1e-06,
          "quantization_config": {
            "quant_method": "awq",
            "bits": 4,
            "scale": 1.0,
            "ignore": [
              "lm_head",
              "re:.*visual.*"
            ],
            "empty": {},
            "none": null
          }
        }

        """)
    }

    func testFourSpaceAndOneLineConfigs() throws {
        let four = "{\n    \"a\": 1.0\n}"
        XCTAssertEqual(try ConfigEdit.addingTopLevelKey("q", value: .object([("b", 2)]), to: four, path: "c"),
                       "{\n    \"a\": 1.0,\n    \"q\": {\n        \"b\": 2\n    }\n}")
        XCTAssertEqual(try ConfigEdit.addingTopLevelKey("q", value: .object([("b", 2)]), to: "{\"a\": 1.0}", path: "c"),
                       "{\"a\": 1.0, \"q\": {\"b\": 2}}")
        XCTAssertEqual(try ConfigEdit.addingTopLevelKey("q", value: 3, to: "{}", path: "c"), "{\n  \"q\": 3\n}")
    }

    func testRefusesAQuantizedOrBrokenConfig() {
        XCTAssertThrowsError(try ConfigEdit.addingTopLevelKey("quantization_config", value: 1,
                                                              to: "{\"quantization_config\": {}}", path: "m/config.json")) { e in
            XCTAssertTrue("\(e)".contains("m/config.json") && "\(e)".contains("already"), "\(e)")
        }
        XCTAssertThrowsError(try ConfigEdit.addingTopLevelKey("q", value: 1, to: "[1, 2]", path: "m/config.json")) { e in
            XCTAssertTrue("\(e)".contains("not a JSON object"), "\(e)")
        }
    }

    func testStringsAreEscaped() {
        XCTAssertEqual(JSONText.string("a\"b\\c\n\u{1}").rendered(indent: "  ", level: 0), "\"a\\\"b\\\\c\\n\\u0001\"")
        XCTAssertEqual(JSONText.double(0.1).rendered(indent: "", level: 0), "0.1")
        XCTAssertEqual(JSONText.double(-2).rendered(indent: "", level: 0), "-2.0")
    }

    func testQuantizationConfigsAreReadBack() throws {
        func parse(_ q: JSONText) throws -> CheckpointQuantization? {
            let text = try ConfigEdit.addingTopLevelKey("quantization_config", value: q, to: "{\"model_type\": \"llama\"}", path: "c")
            return try CheckpointQuantization.parse(Data(text.utf8), path: "c")
        }
        let ct = try parse(QuantizationConfigBlock.compressedTensors(bits: 4, group: 128, symmetric: false, activationBits: nil, ignore: ["lm_head"]))
        XCTAssertEqual(ct, CheckpointQuantization(format: .compressedTensors, bits: 4, group: 128, symmetric: false,
                                                  activationBits: nil, packing: "pack-quantized"))
        let w8a8 = try parse(QuantizationConfigBlock.compressedTensors(bits: 8, group: -1, symmetric: true, activationBits: 8, ignore: []))
        XCTAssertEqual(w8a8?.packing, "int-quantized"); XCTAssertEqual(w8a8?.activationBits, 8); XCTAssertEqual(w8a8?.group, -1)
        XCTAssertEqual(try parse(QuantizationConfigBlock.awq(bits: 4, group: 128, ignore: ["visual"]))?.format, .awq)
        let gptq = try parse(QuantizationConfigBlock.gptq(bits: 3, group: 128, ignore: []))
        XCTAssertEqual(gptq, CheckpointQuantization(format: .gptq, bits: 3, group: 128, symmetric: false, activationBits: nil))
        XCTAssertNil(try CheckpointQuantization.parse(Data("{\"model_type\": \"llama\"}".utf8), path: "c"))
        XCTAssertThrowsError(try parse(.object([("quant_method", "bitsandbytes")]))) { e in
            XCTAssertTrue("\(e)".contains("unknown quant_method 'bitsandbytes'"), "\(e)")
        }
    }
}
