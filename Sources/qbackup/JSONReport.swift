import ArgumentParser
import BackupChain
import BitmapStore
import FoundationEssentials
import QCowImage

/// DESIGN "Command line": with `--output json`, a command whose JSON is an object prints
/// exactly one object on stdout — its report with the warnings it gave (`"warnings": [...]`),
/// or, when it fails, `{"error": {...}, "warnings": [...]}` — besides the stderr lines.
/// Commands whose JSON is an array shaped like qemu-img's keep warnings and errors on stderr.
enum JSONReport {
    /// Every warning of this run, in order (`warning()` adds them).
    nonisolated(unsafe) static var warnings: [String] = []
    /// The object the command reported, printed by `ExitStatus.run` once the command is done.
    nonisolated(unsafe) static var pending: JSON?

    /// The command's report: printed when the command succeeds, with its warnings.
    static func set(_ value: JSON) {
        guard case .object = value else {
            emit(value.pretty() + "\n")
            return
        }
        pending = value
    }

    /// Prints the pending report (with the warnings) or, after `error`, the error object.
    static func finish(error: Error?) {
        let warningsPair = ("warnings", JSON.array(warnings.map(JSON.string)))
        if let error {
            emit(JSON.object([("error", .object(fields(of: error))), warningsPair]).pretty() + "\n")
        } else if case .object(let pairs) = pending {
            emit(JSON.object(pairs + [warningsPair]).pretty() + "\n")
        }
        pending = nil
    }

    /// A usage error (exit 2, from the argument parser) with `--output json` in `arguments`: the
    /// error object on stdout too (code "usage"), unless the command's JSON is an array shaped like
    /// qemu-img's or its stdout carries data (`restore --to -`).
    static func usageError(_ message: String, arguments: [String]) {
        let words = Array(arguments.prefix { $0 != "--" })
        func has(_ option: String, _ value: String) -> Bool {
            words.contains("\(option)=\(value)") || zip(words, words.dropFirst()).contains { $0 == (option, value) }
        }
        guard has("--output", "json") else { return }
        // The subcommand path: the leading words that name a subcommand of the one before.
        var command: ParsableCommand.Type = QBackup.self
        var path: [String] = []
        for word in words {
            guard let sub = command.configuration.subcommands.first(where: { $0._commandName == word }) else { break }
            (command, path) = (sub, path + [word])
        }
        switch path {
        case ["map"], ["bitmap", "dump"]: return
        case ["info"] where words.contains("--backing-chain"): return
        case ["restore"] where has("--to", "-"): return
        default: break
        }
        let error: [(String, JSON)] = [("message", .string(message.replacing("\n", with: " "))), ("code", .string("usage")),
                                       ("file", .null), ("offset", .null), ("region", .null)]
        emit(JSON.object([("error", .object(error)), ("warnings", .array([]))]).pretty() + "\n")
        StandardOutput.flush()
    }

    /// message (the same text as the `qbackup: error:` line), code, file, offset and region.
    static func fields(of error: Error) -> [(String, JSON)] {
        let message: String
        var code: String?
        var file: String?
        var offset: UInt64?
        var region: String?
        switch error {
        case let e as QCowError:
            (file, offset, region) = (e.path, e.offset, e.region)
        case let e as BitmapError:
            (file, offset, region) = (e.path, e.offset, e.region)
        case let e as ChainError:
            file = e.path
        default:
            break
        }
        if let coded = error as? CodedError {
            message = coded.description
            // invalidFormat → invalid-format, as the other JSON keys and values are spelled.
            code = coded.errorCode.rawValue.reduce(into: "") { out, c in out += c.isUppercase ? "-" + c.lowercased() : String(c) }
        } else if let cocoa = error as? CocoaError {
            message = ExitStatus.describe(cocoa)
            file = cocoa.filePath ?? cocoa.url?.path
        } else {
            message = "\(error)"
        }
        return [("message", .string(message.replacing("\n", with: " "))),
                ("code", code.map(JSON.string) ?? .null), ("file", file.map(JSON.string) ?? .null),
                ("offset", offset.map(JSON.uint) ?? .null), ("region", region.map(JSON.string) ?? .null)]
    }
}
