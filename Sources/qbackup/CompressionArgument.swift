import ArgumentParser
import QCowImage

/// `--compress zlib|zstd`, `--compression-type zlib|zstd`: the one compression enum, as the
/// image header names it.
extension CompressionType: ExpressibleByArgument {
    public init?(argument: String) {
        switch argument {
        case "zlib": self = .zlib
        case "zstd": self = .zstd
        default: return nil
        }
    }

    public static var allValueStrings: [String] { ["zlib", "zstd"] }
    public var defaultValueDescription: String { name }
}

/// `backup --compress none|zlib|zstd`: a codec, or none (plain clusters).
struct CompressionArgument: ExpressibleByArgument {
    let type: CompressionType?

    init(type: CompressionType?) { self.type = type }

    init?(argument: String) {
        if argument == "none" {
            type = nil
        } else if let codec = CompressionType(argument: argument) {
            type = codec
        } else {
            return nil
        }
    }

    static var allValueStrings: [String] { ["none"] + CompressionType.allValueStrings }
    var defaultValueDescription: String { type?.name ?? "none" }
}
